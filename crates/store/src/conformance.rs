//! The conformance suite every [`RepairStore`] implementation passes: the redb store and the
//! model store run it in this crate's tests, and other crates may run it on their own stores.
//!
//! Each case builds a fresh store with [`suite_groups`] and the shape it is given, through the
//! caller's factory, which returns the store and a guard kept alive for the case (a temporary
//! directory, say). A failed check panics with a message naming the case, as a test should.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use propd_merkle::{Entity, NodeId, Property, Shape, TagValue, Tree, TreeBuilder, shard_of};

use crate::config::{GroupDef, Groups};
use crate::error::{StoreError, ValidationError};
use crate::repair_view::{LeafKey, RepairOutcome, RepairStore};

/// The group every case writes to.
pub const GROUP: &str = "conf";
/// Its shard count.
pub const SHARD_NUM: u32 = 4;
/// The shard the cases use.
pub const SHARD: u32 = 1;

/// The group definitions a factory must give its store.
pub fn suite_groups() -> Groups {
    Groups::new([
        GroupDef::new(GROUP, SHARD_NUM, 1),
        GroupDef::new("other", 2, 0),
    ])
    .expect("the suite's groups are valid")
}

/// The shapes the suite runs with: the default (three bucket levels) and the reference's three
/// levels (depth 0), so both a deep and a flat tree are covered.
pub fn suite_shapes() -> Vec<Shape> {
    vec![Shape::default(), Shape::reference()]
}

/// One named case of the suite.
type Case<S> = (&'static str, fn(&S, Shape));

/// Runs every case against stores made by `make(groups, shape)`.
pub fn run_all<S, G>(mut make: impl FnMut(Groups, Shape) -> (S, G))
where
    S: RepairStore<Error = StoreError>,
{
    for shape in suite_shapes() {
        let cases: [Case<S>; 9] = [
            ("empty_shard", empty_shard),
            ("tree_matches_rebuild", tree_matches_rebuild),
            ("version_order_outcomes", version_order_outcomes),
            (
                "batch_outcomes_in_input_order",
                batch_outcomes_in_input_order,
            ),
            ("leaves_paging", leaves_paging),
            (
                "properties_after_pages_in_entity_order",
                properties_after_pages_in_entity_order,
            ),
            (
                "invalid_batch_changes_nothing",
                invalid_batch_changes_nothing,
            ),
            ("shard_addressing", shard_addressing),
            ("any_order_converges", any_order_converges),
        ];
        for (name, case) in cases {
            let (store, guard) = make(suite_groups(), shape);
            assert_eq!(store.shape(), shape, "case {name}: the store's shape");
            case(&store, shape);
            drop(store);
            drop(guard);
        }
    }
}

/// `n` entities of the suite's (group, shard), in entity order.
pub fn entities(n: usize) -> Vec<Entity> {
    let shard_num = NonZeroU32::new(SHARD_NUM).unwrap_or(NonZeroU32::MIN);
    let mut found = Vec::with_capacity(n);
    let mut i = 0u64;
    while found.len() < n {
        let entity = Entity::new(
            GROUP,
            if i.is_multiple_of(3) { "alpha" } else { "beta" },
            &format!("id-{i}"),
        )
        .unwrap_or_else(|error| panic!("a valid test entity: {error}"));
        if shard_of(&entity, shard_num) == SHARD {
            found.push(entity);
        }
        i += 1;
    }
    found.sort();
    found
}

/// A live property of `entity` at `revision` with one tag.
pub fn live(entity: &Entity, revision: i64, tag: i64) -> Property {
    Property {
        group: entity.group().to_owned(),
        name: entity.name().to_owned(),
        id: entity.id().to_owned(),
        tags: BTreeMap::from([("v".to_owned(), TagValue::Int(tag))]),
        mod_revision: revision,
        delete_time: 0,
    }
}

/// A tombstone of `entity`.
pub fn dead(entity: &Entity, revision: i64, delete_time: i64) -> Property {
    Property {
        group: entity.group().to_owned(),
        name: entity.name().to_owned(),
        id: entity.id().to_owned(),
        tags: BTreeMap::new(),
        mod_revision: revision,
        delete_time,
    }
}

fn apply<S: RepairStore<Error = StoreError>>(
    store: &S,
    batch: Vec<Property>,
) -> Vec<RepairOutcome> {
    store
        .repair_apply_batch(GROUP, SHARD, batch)
        .unwrap_or_else(|error| panic!("a valid batch is applied: {error}"))
}

fn rebuild(shape: Shape, properties: &[Property]) -> Tree {
    let mut builder = TreeBuilder::new(shape).unwrap_or_else(|error| panic!("shape: {error}"));
    for property in properties {
        builder
            .push_property(property)
            .unwrap_or_else(|error| panic!("leaf: {error}"));
    }
    builder
        .finish()
        .unwrap_or_else(|error| panic!("tree: {error}"))
}

/// Checks every node the store reports against `expected`, level by level from the root.
fn assert_tree<S: RepairStore<Error = StoreError>>(store: &S, expected: &Tree, case: &str) {
    let root = store
        .tree_node(GROUP, SHARD, NodeId::ROOT)
        .unwrap_or_else(|error| panic!("{case}: root: {error}"));
    let want_root = (!expected.root().is_empty()).then_some(expected.root());
    assert_eq!(root, want_root, "{case}: root");
    let mut frontier = vec![NodeId::ROOT];
    while let Some(node) = frontier.pop() {
        let children = store
            .tree_children(GROUP, SHARD, node)
            .unwrap_or_else(|error| panic!("{case}: children of {node}: {error}"));
        assert_eq!(
            children,
            expected.children(node),
            "{case}: children of {node}"
        );
        for (child, inner) in &children {
            assert_eq!(
                store.tree_node(GROUP, SHARD, *child).ok().flatten(),
                Some(*inner),
                "{case}: node {child}"
            );
        }
        frontier.extend(children.into_iter().map(|(child, _)| child));
    }
    let leaves = store
        .leaves_under(GROUP, SHARD, NodeId::ROOT, None, usize::MAX)
        .unwrap_or_else(|error| panic!("{case}: leaves: {error}"));
    assert_eq!(leaves.as_slice(), expected.leaves(), "{case}: leaves");
}

fn get_all<S: RepairStore<Error = StoreError>>(
    store: &S,
    entities: &[Entity],
) -> Vec<Option<Property>> {
    store
        .get_many(GROUP, SHARD, entities)
        .unwrap_or_else(|error| panic!("get_many: {error}"))
}

fn properties_after_pages_in_entity_order<S: RepairStore<Error = StoreError>>(store: &S, _: Shape) {
    let case = "properties_after_pages_in_entity_order";
    let page = |after: Option<&Entity>, limit| {
        store
            .properties_after(GROUP, SHARD, after, limit)
            .unwrap_or_else(|error| panic!("{case}: {error}"))
    };
    assert_eq!(page(None, 10), Vec::new(), "{case}: empty shard");
    let entities = entities(40);
    // Applied out of entity order, tombstones included.
    let properties: Vec<Property> = entities
        .iter()
        .enumerate()
        .map(|(i, entity)| {
            if i % 5 == 0 {
                dead(entity, 10, 100 + i as i64)
            } else {
                live(entity, 10, i as i64)
            }
        })
        .collect();
    let mut shuffled = properties.clone();
    shuffled.reverse();
    apply(store, shuffled);
    let mut got = Vec::new();
    let mut after: Option<Entity> = None;
    loop {
        let next = page(after.as_ref(), 7);
        assert!(next.len() <= 7, "{case}: a page of {} over 7", next.len());
        let Some(last) = next.last() else { break };
        after = Some(
            last.entity()
                .unwrap_or_else(|error| panic!("{case}: {error}")),
        );
        got.extend(next);
    }
    assert_eq!(
        got, properties,
        "{case}: every property once, in entity order"
    );
    assert_eq!(page(Some(&entities[38]), 10), vec![properties[39].clone()]);
}

fn empty_shard<S: RepairStore<Error = StoreError>>(store: &S, shape: Shape) {
    assert_tree(store, &rebuild(shape, &[]), "empty_shard");
    assert_eq!(
        store.tree_children(GROUP, SHARD, NodeId::ROOT).ok(),
        Some(Vec::new()),
        "empty_shard: no children"
    );
    assert_eq!(get_all(store, &entities(3)), vec![None, None, None]);
}

fn tree_matches_rebuild<S: RepairStore<Error = StoreError>>(store: &S, shape: Shape) {
    let entities = entities(40);
    let properties: Vec<Property> = entities
        .iter()
        .enumerate()
        .map(|(i, entity)| {
            if i % 7 == 0 {
                dead(entity, 10 + i as i64, 500 + i as i64)
            } else {
                live(entity, 10 + i as i64, i as i64)
            }
        })
        .collect();
    let outcomes = apply(store, properties.clone());
    assert!(
        outcomes
            .iter()
            .all(|outcome| *outcome == RepairOutcome::Applied),
        "tree_matches_rebuild: every new copy is applied"
    );
    assert_tree(store, &rebuild(shape, &properties), "tree_matches_rebuild");
    let got = get_all(store, &entities);
    assert_eq!(
        got,
        properties.iter().cloned().map(Some).collect::<Vec<_>>(),
        "tree_matches_rebuild: get_many returns what was stored, tombstones included"
    );
    // Updating a few changes exactly those leaves.
    let mut updated = properties.clone();
    for i in [0, 5, 17] {
        updated[i] = live(&entities[i], 100, 9);
    }
    apply(
        store,
        vec![updated[0].clone(), updated[5].clone(), updated[17].clone()],
    );
    assert_tree(
        store,
        &rebuild(shape, &updated),
        "tree_matches_rebuild: after updates",
    );
}

fn version_order_outcomes<S: RepairStore<Error = StoreError>>(store: &S, _: Shape) {
    let entity = &entities(1)[0];
    let first = live(entity, 10, 1);
    assert_eq!(
        apply(store, vec![first.clone()]),
        vec![RepairOutcome::Applied]
    );
    assert_eq!(
        apply(store, vec![first.clone()]),
        vec![RepairOutcome::Same],
        "identical copy"
    );
    let older = live(entity, 9, 2);
    assert_eq!(
        apply(store, vec![older]),
        vec![RepairOutcome::LocalNewer(first.clone())],
        "older revision: ours comes back"
    );
    let tomb = dead(entity, 10, 77);
    assert_eq!(
        apply(store, vec![tomb.clone()]),
        vec![RepairOutcome::Applied],
        "a tombstone beats a live copy at an equal revision"
    );
    assert_eq!(
        apply(store, vec![first]),
        vec![RepairOutcome::LocalNewer(tomb.clone())],
        "the live copy does not undo the delete"
    );
    let later_tomb = dead(entity, 10, 78);
    assert_eq!(
        apply(store, vec![later_tomb.clone()]),
        vec![RepairOutcome::Applied]
    );
    let newer = live(entity, 11, 3);
    assert_eq!(
        apply(store, vec![newer.clone()]),
        vec![RepairOutcome::Applied]
    );
    assert_eq!(
        get_all(store, std::slice::from_ref(entity)),
        vec![Some(newer)]
    );
}

fn batch_outcomes_in_input_order<S: RepairStore<Error = StoreError>>(store: &S, shape: Shape) {
    let entities = entities(6);
    apply(store, vec![live(&entities[2], 50, 0)]);
    // Input deliberately not in entity order, with one entity twice.
    let batch = vec![
        live(&entities[4], 5, 0),
        live(&entities[2], 40, 0),
        live(&entities[0], 5, 0),
        live(&entities[4], 6, 0),
        live(&entities[4], 6, 0),
    ];
    let outcomes = apply(store, batch);
    assert_eq!(
        outcomes,
        vec![
            RepairOutcome::Applied,
            RepairOutcome::LocalNewer(live(&entities[2], 50, 0)),
            RepairOutcome::Applied,
            RepairOutcome::Applied,
            RepairOutcome::Same,
        ],
        "outcomes follow the input order; a repeated entity applies in input order"
    );
    let expected = vec![
        live(&entities[0], 5, 0),
        live(&entities[2], 50, 0),
        live(&entities[4], 6, 0),
    ];
    assert_tree(
        store,
        &rebuild(shape, &expected),
        "batch_outcomes_in_input_order",
    );
    assert_eq!(
        apply(store, Vec::new()),
        Vec::new(),
        "an empty batch is fine"
    );
}

fn leaves_paging<S: RepairStore<Error = StoreError>>(store: &S, shape: Shape) {
    let properties: Vec<Property> = entities(50).iter().map(|e| live(e, 1, 0)).collect();
    apply(store, properties.clone());
    let tree = rebuild(shape, &properties);
    for node in
        std::iter::once(NodeId::ROOT).chain(tree.children(NodeId::ROOT).into_iter().map(|(n, _)| n))
    {
        let all = store
            .leaves_under(GROUP, SHARD, node, None, usize::MAX)
            .unwrap_or_else(|error| panic!("leaves: {error}"));
        assert_eq!(
            all.as_slice(),
            tree.leaves_under(node),
            "leaves under {node}"
        );
        let mut paged = Vec::new();
        let mut after: Option<LeafKey> = None;
        loop {
            let page = store
                .leaves_under(GROUP, SHARD, node, after.as_ref(), 3)
                .unwrap_or_else(|error| panic!("page: {error}"));
            assert!(page.len() <= 3, "a page holds at most `limit` leaves");
            let Some(last) = page.last() else { break };
            after = Some(LeafKey::of(last));
            paged.extend(page);
        }
        assert_eq!(
            paged, all,
            "pages of 3 under {node} add up to the whole list"
        );
        assert_eq!(
            store
                .leaves_under(GROUP, SHARD, node, None, 0)
                .ok()
                .map(|page| page.len()),
            Some(0),
            "limit 0 gives an empty page"
        );
    }
}

fn invalid_batch_changes_nothing<S: RepairStore<Error = StoreError>>(store: &S, shape: Shape) {
    let entities = entities(4);
    let stored: Vec<Property> = entities[..2].iter().map(|e| live(e, 3, 0)).collect();
    apply(store, stored.clone());
    let before = rebuild(shape, &stored);
    let wrong_shard = Entity::new(GROUP, "alpha", "x")
        .ok()
        .into_iter()
        .chain((0..100).filter_map(|i| Entity::new(GROUP, "alpha", &format!("x{i}")).ok()))
        .find(|entity| NonZeroU32::new(SHARD_NUM).is_some_and(|n| shard_of(entity, n) != SHARD))
        .unwrap_or_else(|| panic!("an entity of another shard"));
    let mut empty_id = live(&entities[3], 1, 0);
    empty_id.id.clear();
    let mut bad_revision = live(&entities[3], 1, 0);
    bad_revision.mod_revision = 0;
    let mut foreign_group = live(&entities[3], 1, 0);
    foreign_group.group = "other".to_owned();
    let huge = {
        let mut property = live(&entities[3], 1, 0);
        property.tags.insert(
            "blob".to_owned(),
            TagValue::Binary(vec![7; crate::config::DEFAULT_MAX_PROPERTY_BYTES + 1]),
        );
        property
    };
    let bad_items = [
        live(&wrong_shard, 1, 0),
        empty_id,
        bad_revision,
        foreign_group,
        huge,
    ];
    for bad in bad_items {
        let batch = vec![
            live(&entities[0], 9, 1),
            live(&entities[2], 1, 0),
            bad.clone(),
        ];
        match store.repair_apply_batch(GROUP, SHARD, batch) {
            Err(StoreError::BatchItem { index: 2, .. }) => {}
            other => panic!("a batch with {bad:?} must be refused at index 2, got {other:?}"),
        }
        assert_tree(store, &before, "invalid_batch_changes_nothing");
        assert_eq!(
            get_all(store, &entities[..3]),
            vec![Some(stored[0].clone()), Some(stored[1].clone()), None],
            "nothing of a refused batch is applied"
        );
    }
}

fn shard_addressing<S: RepairStore<Error = StoreError>>(store: &S, _: Shape) {
    assert!(store.has_shard(GROUP, 0));
    assert!(store.has_shard(GROUP, SHARD_NUM - 1));
    assert!(
        !store.has_shard(GROUP, SHARD_NUM),
        "shard_num is out of range"
    );
    assert!(!store.has_shard("nope", 0), "unknown group");
    match store.tree_node("nope", 0, NodeId::ROOT) {
        Err(StoreError::Invalid(ValidationError::UnknownGroup { group })) => {
            assert_eq!(group, "nope")
        }
        other => panic!("unknown group must be refused, got {other:?}"),
    }
    match store.repair_apply_batch(GROUP, SHARD_NUM, Vec::new()) {
        Err(StoreError::Invalid(ValidationError::ShardOutOfRange { shard, .. })) => {
            assert_eq!(shard, SHARD_NUM)
        }
        other => panic!("shard out of range must be refused, got {other:?}"),
    }
    let foreign = Entity::new("other", "n", "i").unwrap_or_else(|error| panic!("{error}"));
    assert!(
        store.get_many(GROUP, SHARD, &[foreign]).is_err(),
        "an entity of another group is refused"
    );
}

fn any_order_converges<S: RepairStore<Error = StoreError>>(store: &S, shape: Shape) {
    // Three versions of each entity arrive in a scrambled order; the newest must win everywhere.
    let entities = entities(10);
    let mut batch = Vec::new();
    let mut newest = Vec::new();
    for (i, entity) in entities.iter().enumerate() {
        let versions = [live(entity, 5, 1), dead(entity, 5, 3), live(entity, 4, 9)];
        newest.push(versions[1].clone());
        for k in 0..3 {
            batch.push(versions[(i + k) % 3].clone());
        }
    }
    for chunk in batch.chunks(4) {
        apply(store, chunk.to_vec());
    }
    assert_eq!(
        get_all(store, &entities),
        newest.iter().cloned().map(Some).collect::<Vec<_>>()
    );
    assert_tree(store, &rebuild(shape, &newest), "any_order_converges");
}
