//! Unit tests of `core_link`, beside it (moved out to keep the module under 800 lines).

//! The link against a fake Redis: a listener in the test that reads the commands and
//! writes the replies by hand.

use std::io::Read;
use std::net::{TcpListener, TcpStream as StdStream};

use mio::{Events, Poll};

use super::*;
use crate::backplane::RedisConfig;

const LINK: Token = Token(9);

struct Harness {
    poll: Poll,
    events: Events,
    link: CoreLink,
    ready: Vec<Arc<AckWaiter>>,
}

impl Harness {
    fn new(bp: &Arc<Backplane>) -> Self {
        Harness {
            poll: Poll::new().unwrap(),
            events: Events::with_capacity(16),
            link: CoreLink::new(bp, 0, 1, LINK),
            ready: Vec::new(),
        }
    }

    /// One loop turn: events for the link, then its end-of-turn work.
    fn pump(&mut self) {
        let _ = self
            .poll
            .poll(&mut self.events, Some(Duration::from_millis(5)));
        for e in self.events.iter() {
            if e.token() == LINK {
                let readable = e.is_readable() || e.is_read_closed() || e.is_error();
                self.link
                    .on_event(self.poll.registry(), readable, e.is_writable());
            }
        }
        self.link
            .turn(self.poll.registry(), Instant::now(), &mut self.ready);
    }
}

/// Reads from `peer` while pumping until `n` commands arrived; returns them as strings.
fn read_commands(
    h: &mut Harness,
    peer: &mut StdStream,
    seen: &mut Vec<u8>,
    n: usize,
) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all = crate::backplane::pipeline::tests::commands(seen);
        if all.len() >= n {
            return all;
        }
        assert!(Instant::now() < deadline, "only {all:?}");
        h.pump();
        let mut buf = [0; 4096];
        match peer.read(&mut buf) {
            Ok(k) => seen.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// The fake Redis: a non-blocking listener and its port.
fn fake_redis() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

fn accept(h: &mut Harness, listener: &TcpListener) -> StdStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        h.pump();
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true).unwrap();
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "the link never connected");
    }
}

fn wait_connected(h: &mut Harness, bp: &Backplane) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bp.publisher_connected() {
        assert!(Instant::now() < deadline, "the link never counted as up");
        h.pump();
    }
}

/// A wrong password: the link never counts as up (readiness stays false), and it retries
/// with a growing backoff rather than at once.
#[test]
fn a_refused_auth_is_an_outage_not_a_link_that_flaps_up() {
    let (listener, port) = fake_redis();
    let mut cfg = RedisConfig::new(format!("redis://:wrong@127.0.0.1:{port}"));
    cfg.reconnect_min = Duration::from_millis(20);
    cfg.reconnect_max = Duration::from_millis(400);
    let bp = Backplane::new(cfg, 1);
    let mut h = Harness::new(&bp);
    let mut gaps = Vec::new();
    let mut last = None::<Instant>;
    for _ in 0..6 {
        let mut peer = accept(&mut h, &listener);
        let now = Instant::now();
        if let Some(last) = last {
            gaps.push(now - last);
        }
        last = Some(now);
        let mut seen = Vec::new();
        let setup = read_commands(&mut h, &mut peer, &mut seen, 1);
        assert_eq!(setup[0], ["AUTH", "wrong"]);
        peer.write_all(b"-WRONGPASS invalid username-password pair\r\n")
            .unwrap();
        for _ in 0..20 {
            h.pump();
            assert!(!bp.publisher_connected(), "a refused AUTH is not up");
        }
    }
    assert_eq!(bp.stats.reconnects.load(Relaxed), 0, "never reconnected");
    // The fifth delay is 160–320 ms (20 ms doubling, jittered to 50–100 %); a backoff that did
    // not grow would retry every 10–20 ms. A loaded machine only makes gaps longer, so a lower
    // bound on the last one is the test that holds on a busy box (comparing gaps did not).
    assert!(
        gaps[4] >= Duration::from_millis(150),
        "the backoff grows: {gaps:?}"
    );
}

#[test]
fn publishes_settles_and_resends_after_a_lost_connection() {
    let (listener, port) = fake_redis();
    let mut cfg = RedisConfig::new(format!("redis://:pw@127.0.0.1:{port}/2"));
    cfg.reconnect_min = Duration::from_millis(10);
    cfg.reconnect_max = Duration::from_millis(50);
    let bp = Backplane::new(cfg, 1);
    let mut h = Harness::new(&bp);
    let mut peer = accept(&mut h, &listener);
    let mut seen = Vec::new();
    let setup = read_commands(&mut h, &mut peer, &mut seen, 2);
    assert_eq!(setup[0], ["AUTH", "pw"]);
    assert_eq!(setup[1], ["SELECT", "2"]);
    assert!(
        !bp.publisher_connected(),
        "not up before AUTH and SELECT are answered"
    );
    peer.write_all(b"+OK\r\n+OK\r\n").unwrap();
    wait_connected(&mut h, &bp);

    // One dispatch to two users: two PUBLISHes, one write; the ack is due after both.
    let d = Arc::new(crate::bus::encode_dispatch(vec!["a".into(), "b".into()], "e", &1).unwrap());
    let w = Arc::new(AckWaiter::new(0, 1, 1, 5, serde_json::Value::Null, 2));
    h.link.publish(&d, Some(&w));
    let sent = read_commands(&mut h, &mut peer, &mut seen, 4);
    assert_eq!(sent[2][..2], ["PUBLISH", "switchboard:u:a"]);
    assert_eq!(sent[3][..2], ["PUBLISH", "switchboard:u:b"]);
    peer.write_all(b":1\r\n").unwrap();
    h.pump();
    h.pump();
    assert!(h.ready.is_empty(), "one of two replies");
    peer.write_all(b":1\r\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.ready.is_empty() && Instant::now() < deadline {
        h.pump();
    }
    assert!(h.ready.len() == 1 && h.ready[0].taken());
    assert_eq!(bp.stats.published.load(Relaxed), 2);

    // Redis goes away with a publication in flight: it is kept, and resent after the
    // reconnect, once the gate (subscriber ready, or given up, plus reconnect_max) opens.
    let d2 = Arc::new(crate::bus::encode_dispatch(vec!["c".into()], "e", &2).unwrap());
    h.link.publish(&d2, None);
    read_commands(&mut h, &mut peer, &mut seen, 5);
    drop(peer);
    let mut peer = accept(&mut h, &listener);
    let reconnected = Instant::now();
    assert!(!bp.publisher_connected() || bp.queue_depth() == 1);
    let mut seen = Vec::new();
    let again = read_commands(&mut h, &mut peer, &mut seen, 3);
    assert_eq!(again[2][..2], ["PUBLISH", "switchboard:u:c"]);
    assert!(
        reconnected.elapsed() >= Duration::from_millis(50),
        "held for reconnect_max after the outage"
    );
    assert!(bp.stats.publish_errors.load(Relaxed) >= 1);
    // The reconnect counts once the setup is answered.
    assert_eq!(bp.stats.reconnects.load(Relaxed), 0);
    peer.write_all(b"+OK\r\n+OK\r\n").unwrap();
    wait_connected(&mut h, &bp);
    assert_eq!(bp.stats.reconnects.load(Relaxed), 1);
    h.link.close(h.poll.registry());
    assert_eq!(bp.queue_depth(), 0);
}

#[test]
fn a_batch_window_holds_the_first_publication_then_writes_what_queued_together() {
    let (listener, port) = fake_redis();
    let mut cfg = RedisConfig::new(format!("redis://127.0.0.1:{port}"));
    cfg.publish_batch_window = Duration::from_millis(60);
    let bp = Backplane::new(cfg, 1);
    let mut h = Harness::new(&bp);
    let mut peer = accept(&mut h, &listener);
    for _ in 0..3 {
        h.pump(); // the connect completes; nothing to send without history or a password
    }
    let one = Arc::new(crate::bus::encode_dispatch(vec!["a".into()], "e", &1).unwrap());
    let two = Arc::new(crate::bus::encode_dispatch(vec!["b".into()], "e", &2).unwrap());
    let first = Instant::now();
    h.link.publish(&one, None);
    h.pump();
    h.link.publish(&two, None);
    h.pump();
    let mut buf = [0; 4096];
    let early = peer.read(&mut buf);
    assert!(
        first.elapsed() >= Duration::from_millis(60)
            || matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "written before the window passed: {early:?}"
    );
    assert!(
        h.link.next_deadline(Instant::now()).is_some(),
        "the loop wakes for it"
    );
    let mut seen = Vec::new();
    let sent = read_commands(&mut h, &mut peer, &mut seen, 2);
    assert!(first.elapsed() >= Duration::from_millis(60));
    assert_eq!(sent[0][..2], ["PUBLISH", "switchboard:u:a"]);
    assert_eq!(sent[1][..2], ["PUBLISH", "switchboard:u:b"]);
    h.link.close(h.poll.registry());
}

#[test]
fn a_pace_writes_the_first_publication_at_once_and_holds_the_next_till_it_passes() {
    let (listener, port) = fake_redis();
    let mut cfg = RedisConfig::new(format!("redis://127.0.0.1:{port}"));
    cfg.publish_pace = Duration::from_millis(80);
    let bp = Backplane::new(cfg, 1);
    let mut h = Harness::new(&bp);
    let mut peer = accept(&mut h, &listener);
    for _ in 0..3 {
        h.pump();
    }
    let one = Arc::new(crate::bus::encode_dispatch(vec!["a".into()], "e", &1).unwrap());
    let two = Arc::new(crate::bus::encode_dispatch(vec!["b".into()], "e", &2).unwrap());
    let three = Arc::new(crate::bus::encode_dispatch(vec!["c".into()], "e", &3).unwrap());
    // After a quiet spell: written on this turn, no wait.
    let first = Instant::now();
    h.link.publish(&one, None);
    h.link.turn(h.poll.registry(), Instant::now(), &mut h.ready);
    assert!(!h.link.pipe.has_unsent(), "written on its turn, not held");
    let mut seen = Vec::new();
    let sent = read_commands(&mut h, &mut peer, &mut seen, 1);
    assert_eq!(sent[0][..2], ["PUBLISH", "switchboard:u:a"]);
    // Within the pace of that write: held, and the loop is told when to write them.
    h.link.publish(&two, None);
    h.pump();
    h.link.publish(&three, None);
    h.pump();
    // The first write was at `first` or later, so the pace runs till `first` + 80 ms at least.
    let held = h.link.pipe.has_unsent();
    if first.elapsed() < Duration::from_millis(80) {
        assert!(held, "held while the pace runs");
        let due = h.link.next_deadline(Instant::now());
        assert!(
            due.is_some_and(|t| t <= first + Duration::from_millis(80)),
            "the loop wakes when the pace has passed: {due:?}"
        );
    }
    let sent = read_commands(&mut h, &mut peer, &mut seen, 3);
    assert!(
        first.elapsed() >= Duration::from_millis(80),
        "held for the pace"
    );
    assert_eq!(sent[1][..2], ["PUBLISH", "switchboard:u:b"]);
    assert_eq!(sent[2][..2], ["PUBLISH", "switchboard:u:c"]);
    h.link.close(h.poll.registry());
}

#[test]
fn replies_nobody_waits_for_are_read_on_the_next_turn_without_a_wake() {
    let (listener, port) = fake_redis();
    let bp = Backplane::new(RedisConfig::new(format!("redis://127.0.0.1:{port}")), 1);
    let mut h = Harness::new(&bp);
    let mut peer = accept(&mut h, &listener);
    for _ in 0..3 {
        h.pump();
    }
    let reading = |h: &Harness| matches!(h.link.conn, Conn::Up { reading: true, .. });
    assert!(reading(&h), "idle: a closed connection is noticed at once");

    let d = Arc::new(crate::bus::encode_dispatch(vec!["a".into()], "e", &1).unwrap());
    h.link.publish(&d, None);
    let mut seen = Vec::new();
    read_commands(&mut h, &mut peer, &mut seen, 1);
    assert!(!reading(&h), "no ack waits on it");
    let now = Instant::now();
    assert!(
        h.link.next_deadline(now) <= Some(now + LAZY_READ),
        "read within LAZY_READ at the latest"
    );
    peer.write_all(b":1\r\n").unwrap();
    h.poll
        .poll(&mut h.events, Some(Duration::from_millis(50)))
        .unwrap();
    assert!(
        !h.events
            .iter()
            .any(|e| e.token() == LINK && e.is_readable()),
        "the reply does not wake the loop"
    );
    h.link.turn(h.poll.registry(), Instant::now(), &mut h.ready);
    assert_eq!(bp.stats.published.load(Relaxed), 1, "read on the turn");
    assert!(
        !reading(&h),
        "not yet: another publication may follow at once"
    );
    let idle = h
        .link
        .next_deadline(Instant::now())
        .expect("a deadline to read again");
    h.link.turn(h.poll.registry(), idle, &mut h.ready);
    assert!(
        reading(&h),
        "nothing in flight for LAZY_READ: reading again"
    );

    // A held ack: its reply wakes the loop.
    let w = Arc::new(AckWaiter::new(0, 1, 1, 5, serde_json::Value::Null, 1));
    h.link.publish(&d, Some(&w));
    read_commands(&mut h, &mut peer, &mut seen, 2);
    assert!(reading(&h));
    peer.write_all(b":1\r\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut woken = false;
    while !woken && Instant::now() < deadline {
        h.poll
            .poll(&mut h.events, Some(Duration::from_millis(50)))
            .unwrap();
        woken = h
            .events
            .iter()
            .any(|e| e.token() == LINK && e.is_readable());
    }
    assert!(woken, "the reply to a held ack wakes the loop");
    h.link.on_event(h.poll.registry(), true, false);
    h.link.turn(h.poll.registry(), Instant::now(), &mut h.ready);
    assert!(h.ready.len() == 1 && h.ready[0].taken());
    h.link.close(h.poll.registry());
}
