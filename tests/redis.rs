//! `RedisShared` against real `redis-server` processes: each test starts its own server, or
//! its own 3-master Redis Cluster, on free ports, so it can stop, pause or restart them.
//! "Processes" here are separate layers, each with its own in-memory cache, its own
//! `RedisShared` and its own Redis connection, in separate tasks; `tests/fleet.rs` runs real
//! OS processes.
//!
//! These tests need `redis-server` and `redis-cli` on the `PATH` (Debian: `apt-get install
//! redis-server redis-tools`, as `.ci/setup` does); without them they fail, they do not skip.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/slow_proxy.rs"]
mod slow_proxy;

use blaze_auth::{
    AccessToken, BlazeAuth, BlazeAuthLayer, EncryptionKey, RedisShared, SharedKey, TokenSource,
    token_fn,
};
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use redis_server::{Backend, RedisCluster, RedisServer, free_port};
use slow_proxy::{Delays, SlowProxy};
use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::{sync::Notify, task::JoinSet};
use tower::{Layer, ServiceExt, service_fn, util::BoxCloneService};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_processes_with_an_expired_shared_token_fetch_one_token() {
    eight_processes_fetch_one_token(&RedisServer::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_eight_processes_with_an_expired_shared_token_fetch_one_token() {
    eight_processes_fetch_one_token(&RedisCluster::start()).await;
}

async fn eight_processes_fetch_one_token(redis: &(impl Backend + Sync)) {
    let endpoint = Endpoint::new(Duration::from_millis(200));
    let key = key();
    // The shared token has expired: every process needs a new one at once.
    redis.set(&token_key(&key), &expired_value()).await;

    let mut processes = JoinSet::new();
    for _ in 0..8 {
        // This test proves that one process fetches, not how soon a lost lock or a dead
        // Redis is got over (other tests do), so nothing here may run out on a starved
        // machine: with a 300 ms lease, a holder starved for 300 ms lost the lock and a
        // second process fetched. A 30 s lease, 9 s op timeout (under a third of the lease,
        // as `build` requires) and 60 s wait (above the lease, as `follower_wait` asks)
        // outlast any stall the test survives.
        let shared = shared(redis, &key, &endpoint)
            .lease(Duration::from_secs(30))
            .op_timeout(Duration::from_secs(9))
            .follower_wait(Duration::from_secs(60))
            .build()
            .unwrap();
        let client = client(shared.clone(), &endpoint);
        processes.spawn(async move {
            let mut requests = JoinSet::new();
            for _ in 0..1000 {
                let client = client.clone();
                requests.spawn(async move { get(client).await });
            }
            let mut tokens = HashSet::new();
            while let Some(answer) = requests.join_next().await {
                let (status, token) = answer.unwrap();
                assert_eq!(status, StatusCode::OK);
                tokens.insert(token);
            }
            (tokens, shared.metrics())
        });
    }
    let mut tokens = HashSet::new();
    let mut source_fetches = 0;
    let mut shared_hits = 0;
    while let Some(process) = processes.join_next().await {
        let (seen, metrics) = process.unwrap();
        tokens.extend(seen);
        source_fetches += metrics.source_fetches;
        shared_hits += metrics.shared_hits;
        assert_eq!(metrics.fallbacks, 0, "{metrics:?}");
    }
    assert_eq!(
        endpoint.fetches(),
        1,
        "one token fetch for 8 x 1000 requests"
    );
    assert_eq!(source_fetches, 1);
    assert_eq!(
        shared_hits, 7,
        "the other seven processes read it from Redis"
    );
    assert_eq!(tokens, HashSet::from(["token-1".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_lock_holder_is_taken_over_after_its_lease() {
    let redis = RedisServer::start();
    let key = key();

    // Process A takes the lock and starts fetching, then dies mid-fetch: no release, no more
    // lease renewals.
    let started = Arc::new(Notify::new());
    let hanging = {
        let started = Arc::clone(&started);
        token_fn(move |_| {
            let started = Arc::clone(&started);
            async move {
                started.notify_one();
                std::future::pending::<Result<AccessToken, Infallible>>().await
            }
        })
    };
    // A lease shorter than the tests' 10 s, so that B takes over soon, and long enough that
    // the lock is surely still there when checked; an op timeout under a third of it.
    let (lease, op_timeout) = (Duration::from_secs(2), Duration::from_millis(600));
    let a = shared_with(&redis, &key, hanging)
        .lease(lease)
        .op_timeout(op_timeout)
        .build()
        .unwrap();
    let crashed = tokio::spawn(async move { a.fetch(None).await });
    started.notified().await;
    crashed.abort();
    let _ = crashed.await;
    assert!(redis.pttl(&lock_key(&key)).await > 0, "A's lock outlives A");

    // Process B waits for A's token, then takes over when A's lease runs out.
    let endpoint = Endpoint::new(Duration::ZERO);
    let b = shared(&redis, &key, &endpoint)
        .lease(lease)
        .op_timeout(op_timeout)
        .build()
        .unwrap();
    let token = b.fetch(None).await.unwrap();
    assert_eq!(token.secret(), "token-1");
    assert_eq!(endpoint.fetches(), 1);
    let metrics = b.metrics();
    assert_eq!(
        (metrics.source_fetches, metrics.fallbacks),
        (1, 0),
        "{metrics:?}"
    );
    assert!(
        redis.get(&token_key(&key)).await.is_some(),
        "B stored its token"
    );
    assert!(
        redis.get(&lock_key(&key)).await.is_none(),
        "B released the lock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_slower_than_the_lease_keeps_the_lock_by_renewing_it() {
    let redis = RedisServer::start();
    let key = key();
    // The fetch takes three leases: without renewals, the lock would expire under it and a
    // second process would fetch too.
    let endpoint = Endpoint::new(Duration::from_millis(3000));
    let process = || {
        shared(&redis, &key, &endpoint)
            .lease(Duration::from_secs(1))
            .op_timeout(Duration::from_millis(300))
            .follower_wait(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let (a, b) = (process(), process());
    let first = tokio::spawn(async move { a.fetch(None).await });
    while endpoint.fetches() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = b.fetch(None).await.unwrap();
    assert_eq!(first.await.unwrap().unwrap().secret(), "token-1");
    assert_eq!(second.secret(), "token-1");
    assert_eq!(endpoint.fetches(), 1);
    let metrics = b.metrics();
    assert_eq!((metrics.waits, metrics.shared_hits), (1, 1), "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slow_within_the_op_timeout_does_not_let_the_lease_run_out_under_a_fetch() {
    let redis = RedisServer::start();
    let key = key();
    // Between A and Redis, each of A's steps around taking the lock takes 3/4 of its op
    // timeout, which is just under a third of the lease: the reply to the SET that takes the
    // lock, the reply to the read after it, and each script call (a renewal) on its way to
    // Redis. A renewal due a third of a lease after the fetch started, not after the SET,
    // would reach Redis 750 + 750 + 1000 + 750 ms after the lock was taken: 250 ms after
    // the 3 s lease ran out, long enough for B to take the lock and fetch a second token.
    // Counted from the SET, the first one is due before the read ends and reaches Redis
    // 750 + 750 + 750 ms after the lock was taken, 750 ms before the lease runs out.
    let lease = Duration::from_secs(3);
    let op_timeout = Duration::from_millis(990);
    let slow = SlowProxy::start(
        redis.port,
        Delays {
            requests: &["EVALSHA"],
            replies: &["SET", "GET"],
            by: Duration::from_millis(750),
        },
    )
    .await;
    // The fetch outlasts the lease.
    let endpoint = Endpoint::new(Duration::from_secs(4));
    let process = |url: &str| {
        shared(&redis, &key, &endpoint)
            .redis_url(url)
            .lease(lease)
            .op_timeout(op_timeout)
            .follower_wait(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let (a, b) = (process(&slow.url()), process(&redis.url()));
    let first = {
        let a = a.clone();
        tokio::spawn(async move { a.fetch(None).await })
    };
    while endpoint.fetches() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // B, straight to Redis, polls every 10 ms: it takes the lock as soon as the lease runs out.
    let second = b.fetch(None).await.unwrap();
    let first = first.await.unwrap().unwrap();
    let (a, b) = (a.metrics(), b.metrics());
    assert_eq!(
        endpoint.fetches(),
        1,
        "B took the lock and fetched: A's lease ran out under its fetch\nA: {a:?}\nB: {b:?}"
    );
    assert_eq!((first.secret(), second.secret()), ("token-1", "token-1"));
    // Each of A's operations answered within its op timeout: Redis was slow, not down.
    assert_eq!((a.redis_errors, a.fallbacks), (0, 0), "{a:?}");
    assert_eq!((b.waits, b.shared_hits), (1, 1), "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_deleted_only_while_it_is_the_stored_one() {
    refused_token_is_compared_and_deleted(&RedisServer::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_refused_token_is_deleted_only_while_it_is_the_stored_one() {
    refused_token_is_compared_and_deleted(&RedisCluster::start()).await;
}

async fn refused_token_is_compared_and_deleted(redis: &(impl Backend + Sync)) {
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let a = shared(redis, &key, &endpoint).build().unwrap();
    let b = shared(redis, &key, &endpoint).build().unwrap();

    let first = a.fetch(None).await.unwrap();
    assert_eq!(b.fetch(None).await.unwrap().secret(), first.secret());
    assert_eq!(endpoint.fetches(), 1);

    // B is refused `first`: it is deleted, and B fetches and stores the next token.
    let second = b.fetch(Some(&first)).await.unwrap();
    assert_eq!(second.secret(), "token-2");
    assert_eq!(b.metrics().invalidations, 1);
    assert!(
        redis
            .get(&token_key(&key))
            .await
            .unwrap()
            .contains("token-2")
    );

    // A is refused `first` later: `second` is stored now and stays; A gets it.
    let for_a = a.fetch(Some(&first)).await.unwrap();
    assert_eq!(for_a.secret(), "token-2");
    assert_eq!(a.metrics().invalidations, 0);
    assert_eq!(endpoint.fetches(), 2);
    assert!(
        redis
            .get(&token_key(&key))
            .await
            .unwrap()
            .contains("token-2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_succeeding_when_redis_stops_and_sharing_resumes_when_it_returns() {
    sharing_survives_a_stop_of_the_keys_server(&mut RedisServer::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_requests_keep_succeeding_when_the_keys_master_stops_and_sharing_resumes() {
    sharing_survives_a_stop_of_the_keys_server(&mut RedisCluster::start()).await;
}

async fn sharing_survives_a_stop_of_the_keys_server(redis: &mut (impl Backend + Sync)) {
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let first = shared(redis, &key, &endpoint)
        .op_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let process = client(first.clone(), &endpoint);
    assert_all_ok(&process, 100).await;
    assert!(redis.get(&token_key(&key)).await.is_some());
    assert_eq!(first.metrics().fallbacks, 0);

    // The server that holds the key (the master of its slot, on a cluster) stops mid-run;
    // the API refuses the token: the process gets a new one without Redis, and every
    // request succeeds.
    redis.stop_owner_of(&token_key(&key));
    for _ in 0..2 {
        endpoint.revoke_all();
        assert_all_ok(&process, 100).await;
    }
    let metrics = first.metrics();
    assert!(
        metrics.fallbacks >= 2 && metrics.redis_errors >= 2,
        "{metrics:?}"
    );
    assert_eq!(endpoint.fetches(), 3);

    // It returns (empty). The next fetches go through Redis again: the process stores its
    // token there, and a new process reads it instead of fetching.
    redis.restart_owner();
    let mut stored = None;
    for _ in 0..50 {
        endpoint.revoke_all();
        assert_all_ok(&process, 10).await;
        stored = redis.get(&token_key(&key)).await;
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stored.is_some(),
        "the token was never stored after Redis returned"
    );
    let fetches = endpoint.fetches();
    let newcomer = shared(redis, &key, &endpoint).build().unwrap();
    assert_all_ok(&client(newcomer.clone(), &endpoint), 10).await;
    assert_eq!(
        endpoint.fetches(),
        fetches,
        "the new process fetched no token"
    );
    assert_eq!(newcomer.metrics().shared_hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_hangs_costs_one_op_timeout_then_the_source_answers() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let shared = shared(&redis, &key, &endpoint)
        .op_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert_eq!(shared.fetch(None).await.unwrap().secret(), "token-1");
    // Counted from here: on a loaded machine the first fetch may have timed out too.
    let before = shared.metrics();

    redis.pause();
    let refused = AccessToken::bearer("token-1").unwrap();
    let token = shared.fetch(Some(&refused)).await.unwrap();
    assert_eq!(token.secret(), "token-2");
    let metrics = shared.metrics();
    assert_eq!(
        (
            metrics.fallbacks - before.fallbacks,
            metrics.redis_errors - before.redis_errors
        ),
        (1, 1),
        "one operation timed out, then the source answered: {metrics:?}"
    );
    redis.resume();
}

#[tokio::test]
async fn no_redis_at_all_is_a_fallback_not_an_error() {
    let port = free_port();
    let endpoint = Endpoint::new(Duration::ZERO);
    let shared = RedisShared::builder(endpoint.source(), key())
        .redis_url(&format!("redis://127.0.0.1:{port}/"))
        .build()
        .unwrap();
    assert_all_ok(&client(shared.clone(), &endpoint), 10).await;
    assert_eq!(endpoint.fetches(), 1);
    assert_eq!(shared.metrics().fallbacks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_hold_a_digest_and_a_new_input_is_a_new_key() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let full = SharedKey::new("http://127.0.0.1:1/token", "client-id-x").scope("full");
    let read = SharedKey::new("http://127.0.0.1:1/token", "client-id-x").scope("read");
    let a = shared(&redis, &full, &endpoint).build().unwrap();
    let b = shared(&redis, &read, &endpoint).build().unwrap();
    assert_eq!(a.fetch(None).await.unwrap().secret(), "token-1");
    assert_eq!(b.fetch(None).await.unwrap().secret(), "token-2");

    let keys = redis.keys().await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        assert!(
            key.starts_with("test:{") && key.ends_with("}:token"),
            "{key}"
        );
        assert!(
            !key.contains("client-id-x") && !key.contains("127.0.0.1"),
            "{key}"
        );
    }
    assert!(keys.contains(&token_key(&full)) && keys.contains(&token_key(&read)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_tokens_are_shared_by_the_key_holders_only() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let secret = EncryptionKey::generate();
    let a = shared(&redis, &key, &endpoint)
        .encryption_key(secret.clone())
        .build()
        .unwrap();
    let b = shared(&redis, &key, &endpoint)
        .encryption_key(secret)
        .build()
        .unwrap();
    assert_eq!(a.fetch(None).await.unwrap().secret(), "token-1");
    let stored = redis.get(&token_key(&key)).await.unwrap();
    assert!(
        stored.contains(":xc20p:") && !stored.contains("token-1"),
        "{stored}"
    );
    assert_eq!(b.fetch(None).await.unwrap().secret(), "token-1");
    assert_eq!(endpoint.fetches(), 1);

    // A process with another key cannot read it, and fetches its own.
    let c = shared(&redis, &key, &endpoint)
        .encryption_key(EncryptionKey::generate())
        .build()
        .unwrap();
    assert_eq!(c.fetch(None).await.unwrap().secret(), "token-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_planted_in_redis_in_clear_is_not_sent_unless_the_source_could_have_made_it() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let now = now_ms();
    let planted = |token_type: &str, expires_at_ms: Option<u64>| {
        let mut json = serde_json::json!({
            "token_type": token_type,
            "access_token": "attacker-token",
            "stored_at_ms": now,
        });
        if let Some(at) = expires_at_ms {
            json["expires_at_ms"] = at.into();
        }
        format!("{}:json:{json}", "0".repeat(32))
    };
    let year = 365 * 24 * 3_600_000;
    for value in [
        planted("Basic", Some(now + 3_600_000)),
        planted("Bearer", None),
        planted("Bearer", Some(now + year)),
    ] {
        redis.set(&token_key(&key), &value).await;
        let process = shared(&redis, &key, &endpoint).build().unwrap();
        let token = process.fetch(None).await.unwrap();
        assert!(token.secret().starts_with("token-"), "{value}");
        let stored = redis.get(&token_key(&key)).await.unwrap();
        assert!(
            stored.contains(token.secret()),
            "the planted value is replaced"
        );
    }
    assert_eq!(endpoint.fetches(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_in_redis_are_ignored_and_replaced_not_a_redis_outage() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let sealed = EncryptionKey::generate();
    let huge = format!(
        "{}:json:{}",
        "0".repeat(32),
        serde_json::json!({"token_type": "Bearer", "access_token": "a".repeat(100_000),
            "expires_at_ms": now_ms() + 3_600_000, "stored_at_ms": now_ms()})
    );
    let oversized = vec![b'x'; 1 << 20];
    let values: [(&[u8], bool); 7] = [
        (b"\xff\xfe not UTF-8", false),
        (&oversized, false),
        (b"\xff\xfe not UTF-8", true),
        (
            b"0:json:{\"token_type\":\"Bearer\",\"access_token\":7}",
            false,
        ),
        (huge.as_bytes(), false),
        // Sealed with a key no process has.
        (
            b"0:xc20p:0badc0de:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            true,
        ),
        (b"0:xc20p:", true),
    ];
    for (n, (value, with_key)) in values.into_iter().enumerate() {
        let mut set = redis::cmd("SET");
        set.arg(token_key(&key)).arg(value);
        redis.query::<()>(set).await;
        let builder = shared(&redis, &key, &endpoint);
        let process = if with_key {
            builder.encryption_key(sealed.clone())
        } else {
            builder
        }
        .build()
        .unwrap();
        let token = process.fetch(None).await.unwrap();
        assert_eq!(token.secret(), format!("token-{}", n + 1));
        let metrics = process.metrics();
        assert_eq!(
            (metrics.fallbacks, metrics.redis_errors),
            (0, 0),
            "{n}: {metrics:?}"
        );
        let stored = redis.get(&token_key(&key)).await.unwrap();
        let fingerprint_and_format = if with_key { ":xc20p:" } else { ":json:" };
        assert!(stored.contains(fingerprint_and_format), "{n}: replaced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_failure_record_stops_the_fleet_no_longer_than_the_longest_cool_down() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let failures = failures_key(&key);
    // Garbage, or a cool-down of a day: neither is a record any process writes.
    let planted = [("not a number", 100_000), ("1", 24 * 3_600_000)];
    for (n, (count, ttl_ms)) in planted.into_iter().enumerate() {
        let mut set = redis::cmd("SET");
        set.arg(&failures).arg(count).arg("PX").arg(ttl_ms);
        redis.query::<()>(set).await;
        redis.del(&token_key(&key)).await;
        let process = shared(&redis, &key, &endpoint).build().unwrap();
        let token = process.fetch(None).await.unwrap();
        assert_eq!(token.secret(), format!("token-{}", n + 1));
        let metrics = process.metrics();
        assert_eq!(
            (metrics.fallbacks, metrics.cooldowns),
            (0, 0),
            "{metrics:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_the_key_never_replaces_a_sealed_token() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let secret = EncryptionKey::generate();
    let sealed = shared(&redis, &key, &endpoint)
        .encryption_key(secret.clone())
        .build()
        .unwrap();
    let plain = shared(&redis, &key, &endpoint).build().unwrap();
    assert_eq!(sealed.fetch(None).await.unwrap().secret(), "token-1");
    let stored = redis.get(&token_key(&key)).await.unwrap();

    // The plain process cannot read it, fetches its own, and may not store it.
    assert_eq!(plain.fetch(None).await.unwrap().secret(), "token-2");
    assert_eq!(redis.get(&token_key(&key)).await.unwrap(), stored);
    // So the keyed processes keep sharing theirs: no fetch back and forth.
    let peer = shared(&redis, &key, &endpoint)
        .encryption_key(secret)
        .build()
        .unwrap();
    assert_eq!(peer.fetch(None).await.unwrap().secret(), "token-1");
    assert_eq!(endpoint.fetches(), 2);

    // A keyed process replaces a clear value (once the sealed one is gone).
    redis.del(&token_key(&key)).await;
    assert_eq!(plain.fetch(None).await.unwrap().secret(), "token-3");
    assert!(
        redis
            .get(&token_key(&key))
            .await
            .unwrap()
            .contains(":json:")
    );
    assert_eq!(peer.fetch(None).await.unwrap().secret(), "token-4");
    assert!(
        redis
            .get(&token_key(&key))
            .await
            .unwrap()
            .contains(":xc20p:")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_encryption_key_rolls_out_without_a_fetch() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let key = key();
    let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
    let before = shared(&redis, &key, &endpoint)
        .encryption_key(old.clone())
        .build()
        .unwrap();
    assert_eq!(before.fetch(None).await.unwrap().secret(), "token-1");

    // Rolled out: the new key seals, the old one still opens.
    let after = shared(&redis, &key, &endpoint)
        .encryption_key(new.clone())
        .previous_encryption_key(old)
        .build()
        .unwrap();
    assert_eq!(after.fetch(None).await.unwrap().secret(), "token-1");
    assert_eq!(endpoint.fetches(), 1);
    // Its next token is sealed with the new key, which the rest of the new fleet reads.
    let refused = AccessToken::bearer("token-1").unwrap();
    assert_eq!(
        after.fetch(Some(&refused)).await.unwrap().secret(),
        "token-2"
    );
    let only_new = shared(&redis, &key, &endpoint)
        .encryption_key(new)
        .build()
        .unwrap();
    assert_eq!(only_new.fetch(None).await.unwrap().secret(), "token-2");
    assert_eq!(endpoint.fetches(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_another_client_secret_does_not_ride_on_the_fleets_token() {
    let redis = RedisServer::start();
    let endpoint = Endpoint::new(Duration::ZERO);
    let right = key().client_secret("right-secret");
    let wrong = key().client_secret("wrong-secret");
    let fleet = shared(&redis, &right, &endpoint).build().unwrap();
    let misconfigured = shared(&redis, &wrong, &endpoint).build().unwrap();
    assert_eq!(fleet.fetch(None).await.unwrap().secret(), "token-1");
    // It fetches (and would fail, on a real endpoint) instead of reading token-1.
    assert_eq!(misconfigured.fetch(None).await.unwrap().secret(), "token-2");
}

#[test]
fn required_encryption_without_a_key_is_a_start_up_error() {
    let endpoint = Endpoint::new(Duration::ZERO);
    let builder = || RedisShared::builder(endpoint.source(), key());
    let error = builder().require_encryption(true).build().err().unwrap();
    assert!(error.is_config());
    let error = builder()
        .previous_encryption_key(EncryptionKey::generate())
        .build()
        .err()
        .unwrap();
    assert!(error.is_config());
    let built = builder()
        .require_encryption(true)
        .encryption_key(EncryptionKey::generate())
        .build();
    assert!(built.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_is_shared_and_its_cool_down_doubles_for_the_fleet() {
    let redis = RedisServer::start();
    let key = key();
    let calls = Arc::new(AtomicU64::new(0));
    let failing = {
        let calls = Arc::clone(&calls);
        token_fn(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<AccessToken, _>("endpoint down") }
        })
    };
    let process = || {
        shared_with(&redis, &key, failing.clone())
            .failure_cooldown(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let (a, b) = (process(), process());
    // The cool-down ends when the failure's PTTL falls to the 60 s memory of the count.
    let failures = failures_key(&key);
    let end_cool_down = || redis.pexpire(&failures, 60_000);

    assert!(a.fetch(None).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // B learns of A's failure from Redis: an error, no call.
    let error = b.fetch(None).await.unwrap_err();
    assert!(error.to_string().contains("1 time(s) in a row"), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(b.metrics().cooldowns, 1);
    let ttl = redis.pttl(&failures_key(&key)).await;
    assert!(
        (60_000..=65_000).contains(&ttl),
        "5 s and the memory: {ttl}"
    );

    // After the cool-down, one call; it fails again, and the next cool-down is twice as long.
    end_cool_down().await;
    assert!(b.fetch(None).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(redis.get(&failures_key(&key)).await.as_deref(), Some("2"));
    let ttl = redis.pttl(&failures_key(&key)).await;
    assert!(
        (65_000..=70_000).contains(&ttl),
        "10 s and the memory: {ttl}"
    );
    assert!(a.fetch(None).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A token stored ends the failures.
    end_cool_down().await;
    let endpoint = Endpoint::new(Duration::ZERO);
    let healthy = shared(&redis, &key, &endpoint).build().unwrap();
    assert_eq!(healthy.fetch(None).await.unwrap().secret(), "token-1");
    assert_eq!(redis.get(&failures_key(&key)).await, None);
    assert_eq!(a.fetch(None).await.unwrap().secret(), "token-1");
}

// Helpers.

/// A token endpoint: counts fetches, issues `token-1`, `token-2`, ... after a delay, and
/// is also the API server that checks them.
struct Endpoint {
    fetches: AtomicU64,
    delay: Duration,
    revoked: Mutex<HashSet<String>>,
}

impl Endpoint {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            fetches: AtomicU64::new(0),
            delay,
            revoked: Mutex::default(),
        })
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }

    fn source(self: &Arc<Self>) -> impl TokenSource + 'static {
        let endpoint = Arc::clone(self);
        token_fn(move |_| {
            let endpoint = Arc::clone(&endpoint);
            async move {
                let n = endpoint.fetches.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(endpoint.delay).await;
                AccessToken::bearer(&format!("token-{n}"))
                    .map(|t| t.with_expires_in(Duration::from_secs(3600)))
            }
        })
    }

    /// Revokes every token issued so far.
    fn revoke_all(&self) {
        let issued = self.fetches();
        let mut revoked = self.revoked.lock().unwrap();
        revoked.extend((1..=issued).map(|n| format!("token-{n}")));
    }

    /// 200 with the token as the body, or 401.
    fn answer(&self, request: &Request<String>) -> Response<String> {
        let token = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "))
            .unwrap_or_default();
        let valid = token.starts_with("token-") && !self.revoked.lock().unwrap().contains(token);
        let mut response = Response::new(token.to_owned());
        if !valid {
            *response.status_mut() = StatusCode::UNAUTHORIZED;
        }
        response
    }
}

type Client = BlazeAuth<BoxCloneService<Request<String>, Response<String>, Infallible>>;

/// One "process": a layer with its own cache over `shared`, in front of `endpoint`'s API.
fn client(shared: impl TokenSource + 'static, endpoint: &Arc<Endpoint>) -> Client {
    let layer = BlazeAuthLayer::builder(shared)
        .study("FHIR-T")
        .storm_window(Duration::ZERO)
        .build()
        .unwrap();
    let endpoint = Arc::clone(endpoint);
    let api = service_fn(move |request: Request<String>| {
        let response = endpoint.answer(&request);
        async move { Ok::<_, Infallible>(response) }
    });
    layer.layer(BoxCloneService::new(api))
}

async fn get(client: Client) -> (StatusCode, String) {
    let request = Request::get("/Patient").body(String::new()).unwrap();
    let response = client.oneshot(request).await.unwrap();
    (response.status(), response.into_body())
}

async fn assert_all_ok(client: &Client, n: usize) {
    let mut requests = JoinSet::new();
    for _ in 0..n {
        requests.spawn(get(client.clone()));
    }
    while let Some(answer) = requests.join_next().await {
        assert_eq!(answer.unwrap().0, StatusCode::OK);
    }
}

fn key() -> SharedKey {
    SharedKey::new("https://login.example.com/oauth/token", "client-1").scope("full")
}

fn shared(
    redis: &impl Backend,
    key: &SharedKey,
    endpoint: &Arc<Endpoint>,
) -> blaze_auth::RedisSharedBuilder<impl TokenSource + 'static> {
    shared_with(redis, key, endpoint.source())
}

/// Test settings: a generous op timeout, so a busy machine does not look like a Redis
/// outage, and the default lease, over three op timeouts as `build` requires. The tests of a
/// takeover set a shorter lease, so that it is quick.
fn shared_with<S: TokenSource>(
    redis: &impl Backend,
    key: &SharedKey,
    source: S,
) -> blaze_auth::RedisSharedBuilder<S> {
    redis
        .configure(RedisShared::builder(source, key.clone()))
        .key_prefix("test:")
        .lease(Duration::from_secs(10))
        .poll_interval(Duration::from_millis(10))
        .op_timeout(Duration::from_secs(2))
}

fn token_key(key: &SharedKey) -> String {
    format!("test:{{{}}}:token", key.digest())
}

fn failures_key(key: &SharedKey) -> String {
    format!("test:{{{}}}:failures", key.digest())
}

fn lock_key(key: &SharedKey) -> String {
    format!("test:{{{}}}:lock", key.digest())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A stored token that expired a second ago, in the layout the module docs give.
fn expired_value() -> String {
    let now = now_ms();
    format!(
        "0123456789abcdef0123456789abcdef:json:{}",
        serde_json::json!({
            "token_type": "Bearer",
            "access_token": "expired-token",
            "expires_at_ms": now - 1000,
            "stored_at_ms": now - 3_601_000,
        })
    )
}
