//! What does the per-core user index cost per connection event and per delivery?
//!
//! [`switchboard::user_index::UserIndex`] is touched on every upgrade (insert), every close
//! (remove) and, per recipient user, on every delivery (get). This bench fills an index with
//! 10k and 100k users (one connection each, as on a busy core) and measures, at that size:
//! a lookup that hits, a lookup that misses (the common case on the cores a user is not on,
//! since cross-core dispatch goes to every core), a phone joining a user already present and
//! leaving again (insert + remove on an existing entry), and a new user connecting and leaving
//! (insert + remove that create and drop the entry). Pairs keep the index at its size.
//!
//! Run: `cargo bench --bench user_index`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchboard::user_index::UserIndex;
use switchboard::UserId;

fn user_index(c: &mut Criterion) {
    let mut group = c.benchmark_group("user_index");
    for n in [10_000usize, 100_000] {
        let users: Vec<UserId> = (0..n).map(|i| UserId::from(format!("user-{i}"))).collect();
        let strangers: Vec<UserId> = (0..n).map(|i| UserId::from(format!("away-{i}"))).collect();
        let mut index = UserIndex::default();
        for (key, user) in users.iter().enumerate() {
            index.insert(user, key);
        }
        assert_eq!(index.len(), n);
        // Walk the ids with a stride so consecutive lookups do not hit neighbouring buckets.
        let stride = 7919 % n;
        let mut i = 0;
        let mut next = move || {
            i = (i + stride) % n;
            i
        };

        group.bench_with_input(BenchmarkId::new("get_hit", n), &n, |b, _| {
            b.iter(|| black_box(index.get(&users[next()])).len())
        });
        group.bench_with_input(BenchmarkId::new("get_miss", n), &n, |b, _| {
            b.iter(|| black_box(index.get(&strangers[next()])).len())
        });
        group.bench_with_input(
            BenchmarkId::new("second_device_join_leave", n),
            &n,
            |b, _| {
                b.iter(|| {
                    let user = &users[next()];
                    let first = index.insert(user, usize::MAX / 2);
                    let last = index.remove(user, usize::MAX / 2);
                    black_box((first, last))
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("new_user_join_leave", n), &n, |b, _| {
            b.iter(|| {
                let user = &strangers[next()];
                let first = index.insert(user, usize::MAX / 2);
                let last = index.remove(user, usize::MAX / 2);
                black_box((first, last))
            })
        });
        assert_eq!(index.len(), n);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = user_index
}
criterion_main!(benches);
