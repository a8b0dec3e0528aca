//! A small seeded generator (SplitMix64): the same seed gives the same sequence on every
//! machine, which is all the nemesis needs to make a schedule reproducible.

/// SplitMix64 state.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// An independent generator derived from this seed and a stream number, so that adding a
    /// draw in one stream (say, a client) does not shift another (the schedule).
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut mixer = Self(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        Self(mixer.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "Rng::between({low}, {high})");
        low + self.below(high - low + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let a: Vec<u64> = {
            let mut rng = Rng::new(42);
            (0..16).map(|_| rng.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut rng = Rng::new(42);
            (0..16).map(|_| rng.next_u64()).collect()
        };
        assert_eq!(a, b);
        let mut other = Rng::new(43);
        assert_ne!(a[0], other.next_u64());
    }

    #[test]
    fn streams_differ_from_each_other_and_from_the_seed() {
        let mut s0 = Rng::stream(7, 0);
        let mut s1 = Rng::stream(7, 1);
        let mut plain = Rng::new(7);
        let (a, b, c) = (s0.next_u64(), s1.next_u64(), plain.next_u64());
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, c);
    }

    #[test]
    fn ranges_are_respected_and_covered() {
        let mut rng = Rng::new(1);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let x = rng.between(3, 7);
            assert!((3..=7).contains(&x));
            seen[(x - 3) as usize] = true;
        }
        assert!(
            seen.iter().all(|s| *s),
            "every value of 3..=7 drawn: {seen:?}"
        );
        let hits = (0..10_000).filter(|_| rng.chance(30)).count();
        assert!(
            (2_500..3_500).contains(&hits),
            "30% of 10000 draws, got {hits}"
        );
    }
}
