//! A seeded harness on a virtual clock: one fetcher and several holders exchanging real
//! wire frames over simulated links with latency and upload rates. It drives the fetch core
//! through fan-in, a slow peer, peer loss, corrupt chunks, malformed frames and a resume,
//! checks invariants after every step, and hashes every event into a trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use mycel_chunker::cdc::Cutter;
use mycel_chunker::manifest::{Kind, NodeEntry, Root, TreeBuilder};
use mycel_chunker::{Cid, Config as ChunkerConfig};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::*;
use crate::wire::Frame;

type Store = BTreeMap<Cid, Vec<u8>>;

/// An object made by the real chunker and manifest builder.
fn object(seed: u64, len: usize) -> (Cid, Store, Vec<u8>) {
    let config = ChunkerConfig {
        chunk_bytes_min: 1024,
        chunk_bytes_avg: 4096,
        chunk_bytes_max: 16384,
        fanout_bits: 3,
        ..ChunkerConfig::default()
    };
    object_with(seed, len, config)
}

/// An object with wide index nodes, so transfers are bound by bandwidth, not tree walks.
fn wide_object(seed: u64, len: usize) -> (Cid, Store, Vec<u8>) {
    let config = ChunkerConfig {
        chunk_bytes_min: 4096,
        chunk_bytes_avg: 16384,
        chunk_bytes_max: 65536,
        fanout_bits: 7,
        ..ChunkerConfig::default()
    };
    object_with(seed, len, config)
}

fn object_with(seed: u64, len: usize, config: ChunkerConfig) -> (Cid, Store, Vec<u8>) {
    let mut data = vec![0u8; len];
    ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut data);
    let mut store = Store::new();
    let mut tree = TreeBuilder::new(&config, true);
    let mut at = 0;
    for l in Cutter::new(&config).lengths(&data) {
        let chunk = &data[at..at + l];
        at += l;
        let cid = Cid::raw(chunk);
        store.insert(cid, chunk.to_vec());
        tree.push(NodeEntry::Chunk { len: l as u64, cid });
    }
    let (t, total) = tree.finish();
    for b in tree.take_blocks() {
        store.insert(b.cid, b.bytes);
    }
    let root = Root { kind: Kind::File, config, len: total, tree: t }.encode();
    store.insert(root.cid, root.bytes);
    (root.cid, store, data)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Flips a byte in every chunk it sends.
    Corrupt,
    /// Answers nothing (a stalled or dead peer).
    Silent,
    /// Sends garbage instead of frames.
    Garbage,
}

struct Holder {
    id: PeerId,
    store: Store,
    /// Upload bytes per millisecond.
    rate: u64,
    busy_until: u64,
    behaviour: Behaviour,
    alive: bool,
    same_zone: bool,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A frame reaches the holder `to`.
    ToHolder { to: usize, frame: Vec<u8> },
    /// A frame (or garbage) reaches the fetcher from holder `from`.
    ToFetcher { from: usize, frame: Vec<u8> },
    /// Holder `who` dies.
    Kill { who: usize },
}

struct World {
    now: u64,
    seq: u64,
    latency_ms: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    holders: Vec<Holder>,
    store: Store,
    fetch: Fetch,
    trace: blake3::Hasher,
    requests: BTreeMap<Cid, u32>,
    outcome: Option<Action>,
}

fn peer(n: usize) -> PeerId {
    PeerId::from_bytes(&[n as u8 + 1; 38]).unwrap()
}

impl World {
    fn new(root: Cid, holders: Vec<Holder>, store: Store) -> World {
        let mut fetch =
            Fetch::new(root, Config { timeout_ms: 2_000, ..Config::default() }, Timestamp(0));
        for h in &holders {
            fetch.add_peer(h.id, h.same_zone);
        }
        World {
            now: 0,
            seq: 0,
            latency_ms: 5,
            queue: BinaryHeap::new(),
            holders,
            store,
            fetch,
            trace: blake3::Hasher::new(),
            requests: BTreeMap::new(),
            outcome: None,
        }
    }

    fn at(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, e)));
    }

    fn log(&mut self, what: &str) {
        self.trace.update(format!("{} {what}\n", self.now).as_bytes());
    }

    /// Runs until the fetch finishes or `limit_ms` passes.
    fn run(&mut self, limit_ms: u64) {
        loop {
            self.drain();
            self.fetch.check_invariants();
            if self.outcome.is_some() {
                return;
            }
            let next_event = self.queue.peek().map(|Reverse((t, _, _))| *t);
            let next_timer = self.fetch.poll_timeout().map(|t| t.0);
            let next = match (next_event, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).expect("the fetch is waiting on nothing"),
            };
            assert!(next <= limit_ms, "no progress by {limit_ms} ms");
            self.now = self.now.max(next);
            if next_timer.is_some_and(|t| t <= self.now) {
                self.log("timeout");
                self.fetch.handle_timeout(Timestamp(self.now));
            }
            while self.queue.peek().is_some_and(|Reverse((t, _, _))| *t <= self.now) {
                let Reverse((_, _, e)) = self.queue.pop().expect("peeked");
                self.deliver(e);
            }
        }
    }

    fn drain(&mut self) {
        while let Some(action) = self.fetch.poll_action(Timestamp(self.now)) {
            self.log(&format!("{action:?}").chars().take(200).collect::<String>());
            match action {
                Action::Lookup { cid, need_bytes } => {
                    let local = match self.store.get(&cid) {
                        None => Local::Absent,
                        Some(b) if need_bytes => Local::Bytes(b.clone()),
                        Some(_) => Local::Present,
                    };
                    self.fetch.handle_local(cid, local);
                }
                Action::Request { peer: p, req, root, cids } => {
                    for c in &cids {
                        *self.requests.entry(*c).or_default() += 1;
                    }
                    let to = self.holders.iter().position(|h| h.id == p).expect("known peer");
                    let frame = Frame::Want {
                        req,
                        root: root.to_bytes(),
                        cids: cids.iter().map(Cid::to_bytes).collect(),
                    }
                    .encode();
                    self.at(self.now + self.latency_ms, Event::ToHolder { to, frame });
                }
                Action::Store { cid, bytes, .. } => {
                    assert!(cid.matches(&bytes), "the core stored a corrupt block {cid}");
                    self.store.insert(cid, bytes);
                }
                Action::Penalize { peer: p, disconnect, .. } => {
                    if disconnect {
                        let i = self.holders.iter().position(|h| h.id == p).expect("known");
                        self.holders[i].alive = false;
                    }
                }
                Action::WhoHas { .. } => {}
                a @ (Action::Complete { .. } | Action::Failed { .. }) => self.outcome = Some(a),
            }
        }
    }

    fn deliver(&mut self, e: Event) {
        match e {
            Event::Kill { who } => {
                self.log(&format!("kill {who}"));
                self.holders[who].alive = false;
                self.fetch.peer_gone(&self.holders[who].id);
            }
            Event::ToHolder { to, frame } => {
                let h = &self.holders[to];
                if !h.alive || h.behaviour == Behaviour::Silent {
                    return;
                }
                let len = Frame::check_len(frame[..4].try_into().unwrap()).unwrap();
                let Frame::Want { req, cids, .. } = Frame::decode(&frame[4..4 + len]).unwrap()
                else {
                    panic!("holders only get want lists");
                };
                for c in cids {
                    let cid = crate::wire::cid(&c).unwrap();
                    let h = &mut self.holders[to];
                    let reply = match (h.store.get(&cid), h.behaviour) {
                        (_, Behaviour::Garbage) => vec![0xffu8; 64],
                        (Some(b), Behaviour::Corrupt)
                            if cid.codec() == mycel_chunker::Codec::Raw =>
                        {
                            let mut b = b.clone();
                            b[0] ^= 1;
                            Frame::Block { req, cid: c, bytes: b }.encode()
                        }
                        (Some(b), _) => Frame::Block { req, cid: c, bytes: b.clone() }.encode(),
                        (None, _) => Frame::DontHave { req, cid: c }.encode(),
                    };
                    let start = h.busy_until.max(self.now);
                    h.busy_until = start + (reply.len() as u64).div_ceil(h.rate);
                    let arrive = h.busy_until + self.latency_ms;
                    self.at(arrive, Event::ToFetcher { from: to, frame: reply });
                }
            }
            Event::ToFetcher { from, frame } => {
                let id = self.holders[from].id;
                if !self.holders[from].alive {
                    return;
                }
                // The driver's job: a malformed frame resets the stream and drops the peer.
                let decoded = Frame::check_len(frame[..4].try_into().unwrap()).and_then(|len| {
                    frame
                        .get(4..4 + len)
                        .ok_or(crate::wire::WireError::Empty)
                        .and_then(Frame::decode)
                });
                match decoded {
                    Ok(Frame::Block { cid, bytes, .. }) => {
                        let cid = crate::wire::cid(&cid).unwrap();
                        self.fetch.handle_block(id, cid, bytes, Timestamp(self.now));
                    }
                    Ok(Frame::DontHave { cid, .. }) => {
                        self.fetch.handle_dont_have(id, crate::wire::cid(&cid).unwrap());
                    }
                    Ok(_) | Err(_) => {
                        self.log(&format!("malformed from {from}"));
                        self.holders[from].alive = false;
                        self.fetch.peer_gone(&id);
                    }
                }
            }
        }
    }

    fn received(&self, n: usize) -> u64 {
        let id = self.holders[n].id;
        self.fetch.progress().by_peer.iter().find(|(p, _)| *p == id).map_or(0, |(_, b)| *b)
    }
}

fn holder(n: usize, store: &Store, rate: u64, behaviour: Behaviour) -> Holder {
    Holder {
        id: peer(n),
        store: store.clone(),
        rate,
        busy_until: 0,
        behaviour,
        alive: true,
        same_zone: true,
    }
}

fn assert_complete(w: &World, root: Cid, full: &Store) {
    assert!(
        matches!(w.outcome, Some(Action::Complete { root: r, .. }) if r == root),
        "{:?}",
        w.outcome
    );
    for (cid, bytes) in full {
        assert_eq!(w.store.get(cid), Some(bytes), "{cid} missing or wrong");
    }
}

#[test]
fn fan_in_splits_an_object_across_equal_holders() {
    // Three holders with equal upload rates each deliver at least 25% of the bytes.
    let (root, full, _) = wide_object(1, 16 << 20);
    let holders = (0..3).map(|n| holder(n, &full, 10_000, Behaviour::Honest)).collect();
    let mut w = World::new(root, holders, Store::new());
    w.run(60_000);
    assert_complete(&w, root, &full);
    let total: u64 = (0..3).map(|n| w.received(n)).sum();
    for n in 0..3 {
        assert!(w.received(n) * 4 >= total, "holder {n} sent {} of {total}", w.received(n));
    }
    assert!(w.requests.values().all(|&n| n == 1), "no block requested twice");
}

#[test]
fn a_slow_peer_gets_less_work_but_the_transfer_completes() {
    // A holder 8x slower than the other delivers a small share; the fast one most.
    let (root, full, _) = wide_object(2, 16 << 20);
    let holders = vec![
        holder(0, &full, 16_000, Behaviour::Honest),
        holder(1, &full, 2_000, Behaviour::Honest),
    ];
    let mut w = World::new(root, holders, Store::new());
    w.run(60_000);
    assert_complete(&w, root, &full);
    assert!(w.received(0) > 3 * w.received(1), "fast {} slow {}", w.received(0), w.received(1));
    assert!(w.received(1) > 0, "the slow peer still helps");
}

#[test]
fn work_moves_off_a_lost_peer() {
    // Holder 1 dies mid-transfer: the fetch completes from holder 0, and only blocks that
    // were in flight at the dead peer are requested again.
    let (root, full, _) = object(3, 4 << 20);
    let holders = vec![
        holder(0, &full, 8_000, Behaviour::Honest),
        holder(1, &full, 8_000, Behaviour::Honest),
    ];
    let mut w = World::new(root, holders, Store::new());
    w.at(150, Event::Kill { who: 1 });
    w.run(60_000);
    assert_complete(&w, root, &full);
    let again = w.requests.values().filter(|&&n| n > 1).count();
    assert!(again as u32 <= Config::default().window_max, "{again} blocks requested again");
    assert!(w.received(1) > 0 && w.received(0) > w.received(1));
}

#[test]
fn a_silent_peer_times_out_and_its_work_moves() {
    // A holder that never answers is penalised for stalling; the fetch finishes elsewhere.
    let (root, full, _) = object(4, 1 << 20);
    let holders = vec![
        holder(0, &full, 8_000, Behaviour::Honest),
        holder(1, &full, 8_000, Behaviour::Silent),
    ];
    let mut w = World::new(root, holders, Store::new());
    w.run(120_000);
    assert_complete(&w, root, &full);
    assert_eq!(w.received(1), 0);
}

#[test]
fn corrupt_chunks_are_never_stored_and_their_sender_is_dropped() {
    // A holder flipping bits is disconnected after three corrupt chunks; nothing corrupt is
    // stored (World asserts every Store) and the object completes from the honest holder.
    let (root, full, _) = object(5, 2 << 20);
    let holders = vec![
        holder(0, &full, 8_000, Behaviour::Honest),
        holder(1, &full, 8_000, Behaviour::Corrupt),
    ];
    let mut w = World::new(root, holders, Store::new());
    w.run(60_000);
    assert_complete(&w, root, &full);
    assert!(!w.holders[1].alive, "the corrupting peer was disconnected");
}

#[test]
fn malformed_frames_drop_the_peer_not_the_fetch() {
    // Garbage on the stream drops that peer; the fetch completes from the other.
    let (root, full, _) = object(6, 1 << 20);
    let holders = vec![
        holder(0, &full, 8_000, Behaviour::Honest),
        holder(1, &full, 8_000, Behaviour::Garbage),
    ];
    let mut w = World::new(root, holders, Store::new());
    w.run(60_000);
    assert_complete(&w, root, &full);
}

#[test]
fn partial_holders_serve_what_they_have() {
    // One holder has only half the chunks: it serves those, says DontHave for the rest,
    // and the complete holder fills in.
    let (root, full, _) = object(7, 2 << 20);
    let mut half = full.clone();
    let chunks: Vec<Cid> =
        full.keys().filter(|c| c.codec() == mycel_chunker::Codec::Raw).copied().collect();
    for c in chunks.iter().step_by(2) {
        half.remove(c);
    }
    let holders = vec![
        holder(0, &full, 4_000, Behaviour::Honest),
        holder(1, &half, 16_000, Behaviour::Honest),
    ];
    let mut w = World::new(root, holders, Store::new());
    w.run(60_000);
    assert_complete(&w, root, &full);
    assert!(w.received(1) > 0);
}

#[test]
fn a_restarted_fetch_requests_only_what_is_missing() {
    // With half the blocks already stored (a fetch interrupted by a restart), the new fetch
    // requests none of them.
    let (root, full, _) = object(8, 2 << 20);
    let mut have = Store::new();
    for (i, (c, b)) in full.iter().enumerate() {
        if i % 2 == 0 {
            have.insert(*c, b.clone());
        }
    }
    let already: Vec<Cid> = have.keys().copied().collect();
    let holders = vec![holder(0, &full, 8_000, Behaviour::Honest)];
    let mut w = World::new(root, holders, have);
    w.run(60_000);
    assert_complete(&w, root, &full);
    for c in already {
        assert!(!w.requests.contains_key(&c), "{c} was stored and requested again");
    }
}

#[test]
fn no_holder_means_who_has_and_waiting_not_spinning() {
    // With no peers the fetch asks who-has periodically and stays bounded in actions.
    let (root, _, _) = object(9, 100_000);
    let mut f = Fetch::new(root, Config::default(), Timestamp(0));
    let mut who_has = 0;
    let mut now = Timestamp(0);
    for _ in 0..10 {
        while let Some(a) = f.poll_action(now) {
            match a {
                Action::Lookup { cid, .. } => f.handle_local(cid, Local::Absent),
                Action::WhoHas { .. } => who_has += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        now = f.poll_timeout().expect("waits on the who-has timer");
        f.handle_timeout(now);
    }
    assert!((9..=11).contains(&who_has), "{who_has}");
    assert_eq!(now, Timestamp(Config::default().who_has_ms * 9));
}

fn scenario_trace(seed: u64) -> String {
    let (root, full, _) = object(seed, 2 << 20);
    let holders = vec![
        holder(0, &full, 9_000, Behaviour::Honest),
        holder(1, &full, 3_000, Behaviour::Honest),
        holder(2, &full, 9_000, Behaviour::Corrupt),
        holder(3, &full, 6_000, Behaviour::Honest),
    ];
    let mut w = World::new(root, holders, Store::new());
    w.at(100, Event::Kill { who: 3 });
    w.run(120_000);
    assert_complete(&w, root, &full);
    w.trace.finalize().to_hex().to_string()
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    // Two runs of a scenario with fan-in, a slow, a corrupt and a lost peer hash alike; a
    // different seed hashes differently.
    assert_eq!(scenario_trace(42), scenario_trace(42));
    assert_ne!(scenario_trace(42), scenario_trace(43));
}

/// Drives `f` at `now`, serving manifest blocks from `store` and answering lookups "absent",
/// until it asks for chunks: that request's peer and chunks.
fn first_chunk_request(f: &mut Fetch, store: &Store, now: Timestamp) -> (PeerId, Vec<Cid>) {
    loop {
        match f.poll_action(now).expect("the fetch has work") {
            Action::Lookup { cid, .. } => f.handle_local(cid, Local::Absent),
            Action::Request { peer, cids, .. } => {
                if cids.iter().all(|c| c.codec() == mycel_chunker::Codec::Raw) {
                    return (peer, cids);
                }
                for c in cids {
                    f.handle_block(peer, c, store[&c].clone(), now);
                }
            }
            _ => {}
        }
    }
}

#[test]
fn fetchers_with_several_peers_start_at_different_places() {
    // Fetchers of one object that share holders ask for different chunks first (so a shared
    // source sends each chunk about once and they relay the rest); one seed, one choice; with
    // a single peer the walk order stands whatever the seed.
    let (root, full, _) = wide_object(11, 4 << 20);
    let first = |seed: u64, peers: usize| {
        let mut f = Fetch::new(root, Config { seed, ..Config::default() }, Timestamp(0));
        for n in 0..peers {
            f.add_peer(peer(n), true);
        }
        first_chunk_request(&mut f, &full, Timestamp(0)).1
    };
    assert_ne!(first(1, 2), first(2, 2), "two nodes ask for different chunks first");
    assert_eq!(first(1, 2), first(1, 2), "the same seed makes the same choice");
    assert_eq!(first(1, 1), first(2, 1), "one peer: the walk order, whatever the seed");
}

#[test]
fn dont_have_answers_are_forgotten_after_a_while() {
    // A partial holder says DontHave for everything it is asked; it is not asked again at
    // once, but once the answers expire (it may have fetched them since) it is.
    let (root, full, _) = wide_object(12, 1 << 20);
    let config = Config::default();
    let mut f = Fetch::new(root, config.clone(), Timestamp(0));
    f.add_peer(peer(0), true);
    let now = Timestamp(0);
    let (p, first) = first_chunk_request(&mut f, &full, now);
    let mut refused = std::collections::BTreeSet::new();
    let mut answer = |f: &mut Fetch, cids: Vec<Cid>| {
        for c in cids {
            refused.insert(c);
            f.handle_dont_have(p, c);
        }
    };
    answer(&mut f, first);
    while let Some(a) = f.poll_action(now) {
        match a {
            Action::Request { cids, .. } => answer(&mut f, cids),
            Action::Lookup { cid, .. } => f.handle_local(cid, Local::Absent),
            _ => {}
        }
    }
    assert!(f.poll_action(now).is_none(), "a peer that lacks everything is not asked");
    let wake = f.poll_timeout().expect("a timer for the expiry");
    assert!(wake.0 <= config.lacks_ttl_ms, "wakes by the expiry: {wake:?}");
    f.handle_timeout(Timestamp(config.lacks_ttl_ms));
    let again = std::iter::from_fn(|| f.poll_action(Timestamp(config.lacks_ttl_ms)))
        .find_map(|a| match a {
            Action::Request { peer, cids, .. } => Some((peer, cids)),
            _ => None,
        })
        .expect("asked again after the expiry");
    assert_eq!(again.0, p);
    assert!(again.1.iter().all(|c| refused.contains(c)), "the blocks it lacked before");
}

#[test]
fn a_peer_that_queues_too_long_gets_a_smaller_window() {
    // Blocks that take longer than the queue target from request to arrival shrink the
    // peer's window; prompt ones grow it (slow start).
    let (root, full, _) = wide_object(13, 4 << 20);
    let requested_after = |delay_ms: u64| {
        let mut f = Fetch::new(root, Config::default(), Timestamp(0));
        f.add_peer(peer(0), true);
        let (p, mut asked) = first_chunk_request(&mut f, &full, Timestamp(0));
        while let Some(Action::Request { cids, .. }) = f.poll_action(Timestamp(0)) {
            asked.extend(cids);
        }
        let t = Timestamp(delay_ms);
        for c in &asked {
            f.handle_block(p, *c, full[c].clone(), t);
        }
        let mut next = 0;
        while let Some(a) = f.poll_action(t) {
            if let Action::Request { cids, .. } = a {
                next += cids.len();
            }
        }
        (asked.len(), next)
    };
    let (before, prompt) = requested_after(10);
    let (_, late) = requested_after(Config::default().queue_target_ms + 500);
    assert!(prompt > before, "prompt answers grow the window: {before} -> {prompt}");
    assert!(late < before, "late answers shrink it: {before} -> {late}");
}

#[test]
fn requests_wait_for_room_for_a_whole_want_list() {
    // With a full window, each arriving block frees one slot: the next request waits until
    // a want list's worth is free, and then carries that many blocks (a want list per block
    // would have the holder read, and both sides frame and track, every block alone).
    let (root, full, _) = wide_object(14, 8 << 20);
    let config = Config { window_initial: 32, window_max: 32, want_batch: 8, ..Config::default() };
    let mut f = Fetch::new(root, config, Timestamp(0));
    f.add_peer(peer(0), true);
    let (p, mut asked) = first_chunk_request(&mut f, &full, Timestamp(0));
    while let Some(a) = f.poll_action(Timestamp(0)) {
        if let Action::Request { cids, .. } = a {
            asked.extend(cids);
        }
    }
    let now = Timestamp(1);
    let mut sizes = Vec::new();
    for c in asked.iter().take(16) {
        f.handle_block(p, *c, full[c].clone(), now);
        while let Some(a) = f.poll_action(now) {
            if let Action::Request { cids, .. } = a {
                sizes.push(cids.len());
            }
        }
    }
    assert!(!sizes.is_empty(), "freed slots are refilled");
    assert!(sizes.iter().all(|&n| n >= 8), "want lists of a whole batch: {sizes:?}");
}
