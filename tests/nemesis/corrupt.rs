//! Rotten bytes: which bytes of a stopped node's data file to change. Pure.
//!
//! Random offsets mostly land in free or structural pages (redb then refuses the file or does not
//! notice); the workload's values (`c<client>-<seq>`) are ASCII, so a plan can also aim at them,
//! changing one digit of a stored value into another digit, which is what a rotten disk sector
//! under a property looks like to the checker: a value no client wrote, or one under the wrong
//! revision.

use super::rng::Rng;

/// One change: the byte at `offset` becomes `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flip {
    /// Offset in the file.
    pub offset: usize,
    /// The new byte (always different from the old one).
    pub to: u8,
}

/// Offsets of the sequence digits of every `c<digits>-<digits>` in `data`.
fn value_digits(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        if data[i] != b'c' {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < data.len() && data[j].is_ascii_digit() {
            j += 1;
        }
        if j == i + 1 || j >= data.len() || data[j] != b'-' {
            i += 1;
            continue;
        }
        let mut k = j + 1;
        while k < data.len() && data[k].is_ascii_digit() {
            out.push(k);
            k += 1;
        }
        i = k.max(i + 1);
    }
    out
}

/// `count` changes to `data`: inside stored values when `in_values` and there are any,
/// anywhere otherwise. Offsets are distinct.
pub fn plan(data: &[u8], count: u32, in_values: bool, rng: &mut Rng) -> Vec<Flip> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut flips: Vec<Flip> = Vec::new();
    let digits = if in_values {
        value_digits(data)
    } else {
        Vec::new()
    };
    for _ in 0..count {
        let flip = if digits.is_empty() {
            let offset = rng.below(data.len() as u64) as usize;
            Flip {
                offset,
                to: data[offset] ^ rng.between(1, 255) as u8,
            }
        } else {
            let offset = *rng.pick(&digits);
            let digit = data[offset] - b'0';
            Flip {
                offset,
                to: b'0' + (digit + rng.between(1, 9) as u8) % 10,
            }
        };
        if !flips.iter().any(|f| f.offset == flip.offset) {
            flips.push(flip);
        }
    }
    flips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_digits_are_the_sequence_digits_of_workload_values() {
        let data = b"xx c12-345 c-1 c7- cc3-9 c1x-2";
        let digits = value_digits(data);
        let picked: Vec<u8> = digits.iter().map(|&i| data[i]).collect();
        assert_eq!(picked, b"3459");
    }

    #[test]
    fn plans_aimed_at_values_change_one_digit_into_another() {
        let mut data = vec![0_u8; 1000];
        data[500..505].copy_from_slice(b"c3-17");
        let mut rng = Rng::new(9);
        let flips = plan(&data, 3, true, &mut rng);
        assert!(!flips.is_empty());
        for flip in &flips {
            assert!(flip.offset == 503 || flip.offset == 504, "{flip:?}");
            assert!(flip.to.is_ascii_digit());
            assert_ne!(flip.to, data[flip.offset]);
        }
    }

    #[test]
    fn plans_without_values_change_random_bytes_and_are_reproducible() {
        let data = vec![7_u8; 4096];
        let a = plan(&data, 5, true, &mut Rng::new(1));
        let b = plan(&data, 5, true, &mut Rng::new(1));
        assert_eq!(a, b);
        assert!(!a.is_empty() && a.len() <= 5);
        for flip in &a {
            assert_ne!(flip.to, 7);
        }
        assert!(plan(&[], 3, false, &mut Rng::new(1)).is_empty());
    }
}
