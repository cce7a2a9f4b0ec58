//! The simulated world: one thread, one event queue on a simulated clock, one seeded RNG,
//! and the cores of every node (consensus on a crashable in-memory log, announcer and
//! directory, fetches) driven as the daemon drives them, over a simulated network and disk.
//!
//! A run: bootstrap the managers, commit the cluster (members, grants), then a faulty phase
//! (workload, swarm or scripted faults), then a healed phase in which the network is whole,
//! crashed nodes restart and everything must converge within its bound. Safety checkers
//! ([`crate::check`]) run as events happen; the world checks the rest at the end.
//!
//! Nothing here reads the wall clock, the OS RNG, or the filesystem (the trace writer is
//! handed in by the caller). Maps are ordered, so a seed names one run exactly, and every
//! event feeds a BLAKE3 trace hash.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::io::Write;
use std::rc::Rc;

use ed25519_dalek::SigningKey;
use mycel_chunker::Cid;
use mycel_consensus::command::{Command, Grant, Member, Pin, Role};
use mycel_consensus::heal::ELIGIBLE_TAG;
use mycel_consensus::log::MemBackend;
use mycel_consensus::state::{ClusterState, Outcome};
use mycel_consensus::topology::{self as topo, Decider};
use mycel_consensus::{Config as CoreConfig, Core, FatalError, Output, Timestamp as CoreTime};
use mycel_core::access::{self as core_access, Refusal};
use mycel_core::cluster::client::{
    Client, Config as ClientConfig, Output as ClientOutput, Targets,
};
use mycel_core::cluster::follow::{self, Config as FollowConfig, Follower};
use mycel_core::cluster::wire::ClusterFrame;
use mycel_policy::access;
use mycel_policy::placement::Candidate;
use mycel_policy::plan::{self, Held, NodeState, PinSpec, Settings};
use mycel_proto::announce::{Announcer, Directory, Holdings};
use mycel_proto::fetch::{Action, Config as FetchConfig, Fetch, Local};
use mycel_proto::wire::{Announcement, FRAME_BYTES_MAX, Frame, Partial};
use mycel_proto::{PeerId, Timestamp};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::check::Checker;
use crate::content::{self, Pool};
use crate::report::{COMMIT, Convergence, Report};
use crate::scenario::{FaultMode, Mix, Scenario, Step};

mod checks;
mod cluster;
mod disk;
mod exchange;
mod faults;
mod grants;
mod node;
mod routers;
mod workload;

/// Raft tick.
const TICK_MS: u64 = 100;
/// Ticks per base election timeout.
const ELECTION_TICKS: usize = 10;
/// One base election timeout.
const ELECTION_MS: u64 = TICK_MS * ELECTION_TICKS as u64;
/// Housekeeping period of every node (config pulls, pings, retries, expiry).
const HOUSEKEEPING_MS: u64 = 1_000;
/// How simulated nodes follow the configuration: the daemon's follower, asking one manager
/// (the next each round) every two seconds, so a fleet of a thousand stays cheap to simulate.
const FOLLOW: FollowConfig = FollowConfig {
    period_ms: 2_000,
    answer_window_ms: 5_000,
    entries_bytes_max: 8 << 20,
    fanout: 1,
};
/// Extra delay of a stream frame whose packet was lost (QUIC retransmits).
const RETRANSMIT_MS: u64 = 200;
/// Curious fetches give up after this long.
const CURIOUS_MS: u64 = 60_000;
/// The healed phase: a leader within this many election timeouts...
const HEAL_LEADER_ELECTIONS: u64 = 10;
/// ...every live node on the latest configuration within this long...
const HEAL_CONFIG_MS: u64 = 30_000;
/// ...and every pin at its minimum replicas within this long.
const HEAL_REPLICAS_MS: u64 = 300_000;
/// Bound on queued events (a run that floods itself fails instead of eating memory).
const QUEUE_MAX: usize = 20_000_000;
/// A peer disconnected for misbehaving (corrupt blocks, stalls, bad frames) may reconnect
/// after this long.
const BAN_MS: u64 = 30_000;
/// How often each node's directory checks its invariants (it is the one check whose cost
/// grows with the fleet: every holder of every root).
const DIRECTORY_CHECK_MS: u64 = 10_000;
/// Fleets up to this size check every fetch after every step; larger ones sample.
const EVERY_STEP_NODES_MAX: usize = 200;
/// Housekeeping rounds between the chunk store's periodic syncs.
const STORE_SYNC_ROUNDS: u64 = 5;
/// Capacity every edge reports.
const CAPACITY_BYTES: u64 = 64 << 30;

/// How to run.
pub struct Options {
    /// The seed.
    pub seed: u64,
    /// The scenario.
    pub scenario: Scenario,
    /// Every event as a JSON line, if given.
    pub trace: Option<Box<dyn Write>>,
    /// Planted bugs to switch on (feature `sim-bugs`; ignored otherwise).
    pub bugs: u32,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("seed", &self.seed).field("bugs", &self.bugs).finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Manager,
    Edge,
    /// A member with the router role, subscribed to the scenario's topology name.
    Router,
    /// Not a member: tries to fetch anyway.
    Outsider,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hostility {
    Honest,
    /// Flips a byte in every chunk it serves.
    Corrupt,
    /// Answers want lists with a frame over the size limit.
    Oversized,
}

#[derive(Debug)]
struct Outstanding {
    seq: u64,
    /// Pins this proposal adds (acknowledged with it).
    pins: Vec<Cid>,
    /// Whether it is the cluster's init.
    init: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A replica the plan asked for.
    Replica,
    /// A snapshot's state object.
    State,
    /// Content of a namespace this node may not read (it must be refused).
    Curious(u64),
    /// A version of a topology file this router needs.
    Topology,
}

struct Node {
    peer: PeerId,
    /// The ed25519 secret key inside the PeerId (it signs topology proposals).
    secret: [u8; 32],
    zone: String,
    zone_ix: usize,
    tags: Vec<String>,
    kind: Kind,
    hostility: Hostility,
    raft_id: u64,
    up: bool,
    /// Crashed for good: its disk is gone too.
    dead: bool,
    paused_until: u64,
    skew_ms: u64,
    drift_ppm: u64,
    backend: MemBackend,
    core: Option<Core<MemBackend>>,
    restarts: u64,
    /// The configuration as followed (by log deltas) from managers.
    follower: Follower,
    store: BTreeMap<Cid, Rc<[u8]>>,
    /// Blocks written since the store's last sync (lost or torn by a crash).
    unsynced: BTreeSet<Cid>,
    /// Blocks that were unsynced at the last crash: the recovery verifies them.
    recovering: BTreeSet<Cid>,
    /// Blocks whose write failed, by the root their fetch was for.
    write_failed: BTreeMap<Cid, BTreeSet<Cid>>,
    complete: BTreeSet<Cid>,
    fetches: BTreeMap<Cid, (Fetch, Purpose)>,
    announcer: Announcer,
    directory: Directory,
    timer_at: u64,
    next_housekeeping: u64,
    next_plan: u64,
    /// Digest of the last replication plan's inputs.
    last_plan: Option<[u8; 32]>,
    next_dir_check: u64,
    next_fetch_check: u64,
    proposals: VecDeque<(Vec<Command>, Vec<Cid>)>,
    outstanding: Option<Outstanding>,
    /// The node core's cluster client.
    client: Client,
    up_busy_us: u64,
    /// Peers disconnected for misbehaving, until this local time.
    banned: BTreeMap<PeerId, u64>,
    /// A router's applied topology and reports.
    router: routers::RouterState,
    /// A node running a consensus core: its topology decider (volatile) and the routers'
    /// reports it heard, with the local time they arrived.
    decider: Option<Decider>,
    reports: BTreeMap<usize, (u64, routers::Report)>,
    /// Manifest sets of the roots this node served, for the tree check.
    trees: core_access::Trees,
}

/// A simulated node's disk as the tree check reads it.
struct DiskBlocks<'a>(&'a BTreeMap<Cid, Rc<[u8]>>);

impl core_access::Blocks for DiskBlocks<'_> {
    fn block(&self, cid: &Cid) -> Option<Vec<u8>> {
        self.0.get(cid).filter(|b| cid.matches(b)).map(|b| b.to_vec())
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("peer", &self.peer).field("up", &self.up).finish()
    }
}

impl Node {
    fn view(&self) -> &ClusterState {
        match &self.core {
            Some(c) if c.state().applied_index >= self.follower.state().applied_index => c.state(),
            _ => self.follower.state(),
        }
    }

    fn local(&self, now: u64) -> u64 {
        now + self.skew_ms + now * self.drift_ppm / 1_000_000
    }

    /// The earliest global time at which the local clock reads `local`.
    fn global(&self, local: u64) -> u64 {
        if local <= self.skew_ms {
            return 0;
        }
        let x = (local - self.skew_ms) as u128 * 1_000_000;
        let d = 1_000_000 + self.drift_ppm as u128;
        let mut g = x.div_ceil(d) as u64;
        while g > 0 && self.local(g - 1) >= local {
            g -= 1;
        }
        while self.local(g) < local {
            g += 1;
        }
        g
    }

    fn live(&self) -> bool {
        self.up && !self.dead
    }
}

#[derive(Debug)]
enum Msg {
    Raft(Vec<u8>),
    /// A `/mycel/cluster/1` frame (length prefix included), decoded on arrival.
    Cluster(Vec<u8>),
    Ping(u64),
    Pong(u64),
    Report(u64),
    /// A router's topology report to a manager.
    Topology(routers::Report),
    /// An exchange frame on the stream serving `root` (length prefix included).
    Frame {
        root: Cid,
        bytes: Vec<u8>,
    },
}

impl Msg {
    fn len(&self) -> usize {
        match self {
            Msg::Raft(b) | Msg::Cluster(b) => b.len(),
            Msg::Frame { bytes, .. } => bytes.len(),
            _ => 16,
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Msg::Raft(_) => 1,
            Msg::Cluster(_) => 2,
            Msg::Ping(_) => 6,
            Msg::Pong(_) => 7,
            Msg::Report(_) => 8,
            Msg::Frame { .. } => 9,
            Msg::Topology(_) => 10,
        }
    }

    fn is_stream(&self) -> bool {
        matches!(self, Msg::Frame { .. })
    }
}

#[derive(Debug, Clone)]
enum Partition {
    /// These zones cannot talk to the others.
    Zones(BTreeSet<usize>),
    /// This node talks to nobody.
    Isolate(usize),
    /// Messages from `.0` to `.1` are lost.
    OneWay(usize, usize),
}

#[derive(Debug)]
enum Fault {
    Crash {
        restart_after: Option<u64>,
        role: Option<Kind>,
        node: Option<usize>,
    },
    Restart(usize),
    Pause(Option<usize>, u64),
    Partition(Option<Partition>, u64),
    /// Isolates a live node of this role (any role: `None`).
    IsolateRole(Option<Kind>, u64),
    Unpartition(u64),
    BitFlip,
    FsyncFail,
    Loss(f64),
    HealAll,
}

#[derive(Debug)]
enum Ev {
    Timer(usize),
    Deliver {
        from: usize,
        to: usize,
        msg: Msg,
    },
    Gossip {
        from: usize,
        bytes: Rc<Vec<u8>>,
    },
    Fault(Fault),
    Publish(u32),
    Preposition(u32),
    Curious,
    Outsider(usize),
    /// A router proposes version `k` of the topology file.
    TopologyPropose(u32),
    /// A manager activates an earlier version.
    TopologyRollback,
    /// Temporary grant `k`: granted, used, revoked.
    Grant(u32),
    GrantedFetch(u32),
    Revoke(u32),
    Heal,
    Converge,
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// An acknowledged pin, as the world remembers it for the end checks.
#[derive(Debug, Clone)]
struct PinRec {
    root: Cid,
    namespace: String,
    zone: Option<String>,
}

/// The world of one run.
pub struct World {
    sc: Scenario,
    seed: u64,
    rng: ChaCha8Rng,
    now: u64,
    end_faulty: u64,
    healed_at: Option<u64>,
    queue: BinaryHeap<Reverse<Queued>>,
    next_seq: u64,
    nodes: Vec<Node>,
    members: usize,
    zones: Vec<String>,
    by_peer: BTreeMap<PeerId, usize>,
    partitions: BTreeMap<u64, Partition>,
    next_partition: u64,
    mix: Mix,
    loss: f64,
    pool: Pool,
    /// Replication plans run and skipped (inputs unchanged).
    plans: (u64, u64),
    /// The operator's `cluster init` proposal, and whether it was applied.
    init: Vec<Command>,
    initialised: bool,
    checker: Checker,
    /// Placement draws, shared by every simulated planner (a plan is the same with or
    /// without them; only the hashing is saved).
    scores: mycel_policy::placement::ScoreCache,
    trace: blake3::Hasher,
    trace_out: Option<Box<dyn Write>>,
    events: u64,
    messages: u64,
    bytes: u64,
    faults: BTreeMap<String, u64>,
    pins: Vec<PinRec>,
    pin_by_root: BTreeMap<Cid, usize>,
    acked_pins: BTreeSet<Cid>,
    conv: Convergence,
    done: bool,
    bugs: u32,
    bitflips_left: u32,
    /// Temporary grants of the workload, and (grantee, namespace) pairs revoked.
    grants: BTreeMap<u32, grants::TempGrant>,
    revoked: BTreeSet<(Vec<u8>, String)>,
    /// Replicas released (copies dropped), and how often each node released each root.
    releases: u64,
    released: BTreeMap<(usize, Cid), u32>,
    /// Reads of another zone's namespace that completed (under a temporary grant, or in the
    /// known window before the pin reaches the server's view).
    granted_reads: u64,
    /// Pre-position deadlines, and how many were met and how many fell too early after
    /// the heal to be required.
    deadlines: Vec<grants::DeadlineRec>,
    deadline_counts: (u64, u64),
    /// The scenario's hash as given (before the seed's draws change it).
    scenario_hash: String,
    /// The router fleet and its topology file, if the scenario has routers.
    topo: Option<routers::Fleet>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").field("seed", &self.seed).field("now", &self.now).finish()
    }
}

/// Node `idx`'s ed25519 secret key (drawn from the seed) and its PeerId: the identity
/// multihash of the public key, as libp2p writes it, so managers can verify what it signs.
fn peer_of(seed: u64, idx: usize) -> (PeerId, [u8; 32]) {
    let secret =
        *blake3::hash(format!("mycel-sim node {idx} of seed {seed}").as_bytes()).as_bytes();
    let public = SigningKey::from_bytes(&secret).verifying_key().to_bytes();
    (PeerId::from_bytes(&topo::peer_of_key(&public)).expect("38 bytes"), secret)
}

/// Runs one seed of a scenario to the end.
pub fn run(opts: Options) -> Report {
    let Options { seed, scenario, trace, bugs } = opts;
    set_bugs(bugs);
    let name = scenario.name.clone();
    let hash = scenario.hash();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut w = World::new(seed, scenario, trace, bugs);
        w.run();
        w.report()
    }));
    set_bugs(0);
    outcome.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        let mut r = Report {
            seed,
            scenario: name,
            scenario_hash: hash,
            commit: COMMIT.into(),
            ..Report::default()
        };
        r.violations.push(crate::report::Violation {
            at_ms: 0,
            check: "safety:assertion".into(),
            detail: msg,
        });
        r
    })
}

#[cfg(feature = "sim-bugs")]
fn set_bugs(bugs: u32) {
    use crate::bugs as b;
    let mut word = 0;
    if bugs & b::SKIP_CID_CHECK != 0 {
        word |= mycel_proto::bugs::SKIP_CID_CHECK;
    }
    if bugs & b::ACK_BEFORE_APPLY != 0 {
        word |= mycel_core::bugs::ACK_BEFORE_APPLY;
    }
    if bugs & b::FOLLOW_SKIPS_ENTRY != 0 {
        word |= mycel_core::bugs::FOLLOW_SKIPS_ENTRY;
    }
    if bugs & b::ACK_BEFORE_FSYNC != 0 {
        word |= mycel_consensus::log::bugs::ACK_BEFORE_FSYNC;
    }
    if bugs & b::VOTE_TWICE != 0 {
        word |= mycel_consensus::log::bugs::FORGET_VOTE;
    }
    // One word for every core's switches (each core owns its bits).
    mycel_core::bugs::set(word);
}

#[cfg(not(feature = "sim-bugs"))]
fn set_bugs(_bugs: u32) {}

impl World {
    fn new(seed: u64, mut sc: Scenario, trace_out: Option<Box<dyn Write>>, bugs: u32) -> World {
        let scenario_hash = sc.hash();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let drawn = sc.nodes_max > sc.nodes;
        if drawn {
            sc.nodes = rng.gen_range(sc.nodes..=sc.nodes_max);
            if sc.nodes >= 8 && rng.gen_bool(0.4) {
                sc.managers = 5;
            }
            sc.managers = sc.managers.min(sc.nodes - 1);
            sc.eligible = sc.eligible.min(sc.nodes - sc.managers);
        }
        let mix = match sc.faults.mode {
            FaultMode::Swarm => Mix::draw(&mut rng, &sc.faults),
            FaultMode::Scripted => Mix::scripted(&sc.faults),
            FaultMode::None => Mix::default(),
        };
        if drawn && sc.topology.routers == 0 && sc.faults.mode == FaultMode::Swarm {
            routers::draw(&mut rng, &mut sc);
        }
        let routers = sc.topology.routers as usize;
        let zones: Vec<String> = sc.zones.iter().map(|z| z.name.clone()).collect();
        let members = sc.nodes as usize;
        let total = members + mix.outsiders as usize;
        let managers = sc.managers as usize;
        let weights: Vec<u32> = sc.zones.iter().map(|z| z.weight).collect();
        let weight_sum: u32 = weights.iter().sum();
        let mut nodes = Vec::with_capacity(total);
        let mut edge_ix = 0u32;
        for idx in 0..total {
            let kind = if idx < managers {
                Kind::Manager
            } else if idx < members - routers {
                Kind::Edge
            } else if idx < members {
                Kind::Router
            } else {
                Kind::Outsider
            };
            let zone_ix = if kind == Kind::Manager {
                idx % zones.len()
            } else {
                // Edges by weight, round robin within the weights.
                let slot = edge_ix % weight_sum;
                edge_ix += 1;
                let mut acc = 0;
                weights
                    .iter()
                    .position(|w| {
                        acc += w;
                        slot < acc
                    })
                    .unwrap_or(0)
            };
            let mut tags = Vec::new();
            if kind == Kind::Edge && idx < managers + sc.eligible as usize {
                tags.push(ELIGIBLE_TAG.to_string());
            }
            let (peer, secret) = peer_of(seed, idx);
            let skew_ms = if mix.skew_ms > 0 { rng.gen_range(0..=mix.skew_ms) } else { 0 };
            let drift_ppm = if mix.drift_ppm > 0 { rng.gen_range(0..=mix.drift_ppm) } else { 0 };
            let zone = zones[zone_ix].clone();
            let local0 = skew_ms;
            nodes.push(Node {
                peer,
                secret,
                zone: zone.clone(),
                zone_ix,
                tags,
                kind,
                hostility: Hostility::Honest,
                raft_id: idx as u64 + 1,
                up: true,
                dead: false,
                paused_until: 0,
                skew_ms,
                drift_ppm,
                backend: MemBackend::new(),
                core: None,
                restarts: 0,
                follower: Follower::new(ClusterState::default(), FOLLOW),
                store: BTreeMap::new(),
                unsynced: BTreeSet::new(),
                recovering: BTreeSet::new(),
                write_failed: BTreeMap::new(),
                complete: BTreeSet::new(),
                fetches: BTreeMap::new(),
                announcer: Announcer::new(
                    peer,
                    &zone,
                    sc.announce_period.0,
                    Timestamp(local0),
                    seed ^ (idx as u64) << 20,
                ),
                directory: Directory::new(3 * sc.announce_period.0),
                timer_at: u64::MAX,
                next_housekeeping: local0 + rng.gen_range(0..HOUSEKEEPING_MS),
                next_plan: local0 + rng.gen_range(0..sc.plan_period.0),
                last_plan: None,
                next_dir_check: 0,
                next_fetch_check: 0,
                proposals: VecDeque::new(),
                outstanding: None,
                client: Client::new(peer, ClientConfig::default(), 0),
                up_busy_us: 0,
                banned: BTreeMap::new(),
                router: routers::RouterState::default(),
                decider: None,
                reports: BTreeMap::new(),
                trees: core_access::Trees::default(),
            });
        }
        // Hostile members: edges that are neither eligible nor managers.
        let mut candidates: Vec<usize> =
            (managers + sc.eligible as usize..members - routers).collect::<Vec<_>>();
        candidates.shuffle(&mut rng);
        for (n, idx) in candidates.iter().take(mix.hostile as usize).enumerate() {
            nodes[*idx].hostility =
                if n % 2 == 0 { Hostility::Corrupt } else { Hostility::Oversized };
        }
        let by_peer = nodes.iter().enumerate().map(|(i, n)| (n.peer, i)).collect();
        let end_faulty = sc.duration.0;
        let mut w = World {
            seed,
            rng,
            now: 0,
            end_faulty,
            healed_at: None,
            queue: BinaryHeap::new(),
            next_seq: 0,
            nodes,
            members,
            zones,
            by_peer,
            partitions: BTreeMap::new(),
            next_partition: 0,
            loss: mix.loss,
            mix,
            pool: Pool::default(),
            plans: (0, 0),
            init: Vec::new(),
            initialised: false,
            checker: Checker::default(),
            scores: mycel_policy::placement::ScoreCache::default(),
            trace: blake3::Hasher::new(),
            trace_out,
            events: 0,
            messages: 0,
            bytes: 0,
            faults: BTreeMap::new(),
            pins: Vec::new(),
            pin_by_root: BTreeMap::new(),
            acked_pins: BTreeSet::new(),
            conv: Convergence::default(),
            done: false,
            bugs,
            bitflips_left: 0,
            scenario_hash,
            grants: BTreeMap::new(),
            revoked: BTreeSet::new(),
            releases: 0,
            released: BTreeMap::new(),
            granted_reads: 0,
            deadlines: Vec::new(),
            deadline_counts: (0, 0),
            topo: (routers > 0).then(|| routers::Fleet::new(&sc.topology.name, routers as u32)),
            sc,
        };
        w.bootstrap();
        w
    }

    // ---- the trace ----

    fn record(&mut self, what: &str, a: u64, b: u64) {
        self.trace.update(&self.now.to_le_bytes());
        self.trace.update(what.as_bytes());
        self.trace.update(&a.to_le_bytes());
        self.trace.update(&b.to_le_bytes());
        if let Some(out) = &mut self.trace_out {
            let _ = writeln!(out, "{{\"t\":{},\"ev\":\"{what}\",\"a\":{a},\"b\":{b}}}", self.now);
        }
    }

    fn fault(&mut self, kind: &str, a: u64) {
        *self.faults.entry(kind.to_string()).or_default() += 1;
        self.record(kind, a, 0);
    }

    fn push(&mut self, at: u64, ev: Ev) {
        assert!(self.queue.len() < QUEUE_MAX, "seed {}: event queue over its bound", self.seed);
        self.next_seq += 1;
        self.queue.push(Reverse(Queued { at, seq: self.next_seq, ev }));
    }

    // ---- setup ----

    fn bootstrap(&mut self) {
        let managers = self.sc.managers as usize;
        let voters: Vec<u64> = (1..=managers as u64).collect();
        for i in 0..managers {
            self.start_core(i, voters.clone());
        }
        // The first manager's driver proposes the cluster: every member in index order (so
        // Raft ids follow node indexes), and the grants the workload needs.
        let mut commands = vec![Command::InitCluster { cluster_id: [7; 16] }];
        for i in 0..self.members {
            let n = &self.nodes[i];
            commands.push(Command::AddMember(Member {
                peer: n.peer.as_bytes().to_vec(),
                raft_id: 0,
                role: match n.kind {
                    Kind::Manager => Role::Manager,
                    Kind::Router => Role::Router,
                    _ => Role::Edge,
                },
                zone: n.zone.clone(),
                tags: if n.kind == Kind::Router {
                    vec![topo::subscription_tag(&self.sc.topology.name)]
                } else {
                    n.tags.clone()
                },
                capacity_bytes: CAPACITY_BYTES,
                addrs: vec![],
            }));
        }
        // Every member may publish into the default namespace; each zone reads and
        // publishes its own.
        commands.push(Command::AddGrant(Grant {
            subject: "*".into(),
            permission: "publish".into(),
            namespace: access::DEFAULT_NAMESPACE.into(),
        }));
        for z in &self.zones {
            commands.push(Command::AddGrant(Grant {
                subject: format!("zone:{z}"),
                permission: "publish".into(),
                namespace: format!("ns-{z}"),
            }));
        }
        commands.extend(self.topology_bootstrap());
        self.init = commands.clone();
        self.nodes[0].proposals.push_back((commands, Vec::new()));
        for i in 0..self.nodes.len() {
            self.reschedule(i);
        }
        self.schedule_workload();
        self.schedule_faults();
        self.push(self.end_faulty, Ev::Heal);
    }

    fn core_config(&self, i: usize) -> CoreConfig {
        CoreConfig {
            id: self.nodes[i].raft_id,
            tick_ms: TICK_MS,
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: 2,
            seed: self.seed ^ self.nodes[i].restarts.wrapping_mul(0x5851_f42d_4c95_7f2d),
            ..CoreConfig::default()
        }
    }

    fn start_core(&mut self, i: usize, voters: Vec<u64>) {
        let config = self.core_config(i);
        let local = self.nodes[i].local(self.now);
        let backend = self.nodes[i].backend.clone();
        match Core::new(config, backend, voters, CoreTime(local)) {
            Ok(core) => {
                self.nodes[i].core = Some(core);
                self.record("core-start", i as u64, 0);
            }
            Err(e) => {
                let now = self.now;
                self.checker.fail(
                    now,
                    "safety:restart",
                    format!("node {i} cannot start its core: {e}"),
                );
            }
        }
    }

    // ---- the loop ----

    fn run(&mut self) {
        let hard_end = self.end_faulty + HEAL_REPLICAS_MS + HEAL_CONFIG_MS + 60_000;
        while !self.done {
            let Some(Reverse(q)) = self.queue.pop() else { break };
            assert!(q.at >= self.now, "time went back");
            if q.at > hard_end {
                break;
            }
            self.now = q.at;
            self.events += 1;
            self.handle(q.ev);
        }
        self.final_checks();
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Timer(i) => {
                if self.nodes[i].timer_at != self.now {
                    return; // superseded
                }
                self.nodes[i].timer_at = u64::MAX;
                if !self.nodes[i].live() {
                    return;
                }
                if self.nodes[i].paused_until > self.now {
                    let at = self.nodes[i].paused_until;
                    self.nodes[i].timer_at = at;
                    self.push(at, Ev::Timer(i));
                    return;
                }
                self.record("timer", i as u64, 0);
                self.on_timer(i);
                self.after(i);
            }
            Ev::Deliver { from, to, msg } => {
                let n = &self.nodes[to];
                if !n.live() || self.blocked(from, to) {
                    self.record("lost", from as u64, to as u64);
                    return;
                }
                if n.paused_until > self.now {
                    let at = n.paused_until;
                    self.push(at, Ev::Deliver { from, to, msg });
                    return;
                }
                self.trace.update(&[msg.tag()]);
                if let Msg::Raft(b) = &msg {
                    self.trace.update(b);
                }
                self.record("deliver", from as u64, to as u64);
                let core = !matches!(msg, Msg::Ping(_));
                self.on_message(from, to, msg);
                self.after_step(to, core);
            }
            Ev::Gossip { from, bytes } => self.on_gossip(from, &bytes),
            Ev::Fault(f) => self.on_fault(f),
            Ev::Publish(k) => self.publish(k, false),
            Ev::Preposition(k) => self.publish(k, true),
            Ev::Curious => self.curious(),
            Ev::Outsider(i) => self.outsider(i),
            Ev::TopologyPropose(k) => self.topology_propose(k),
            Ev::TopologyRollback => self.topology_rollback(),
            Ev::Grant(k) => self.grant(k),
            Ev::GrantedFetch(k) => self.granted_fetch(k),
            Ev::Revoke(k) => self.revoke(k),
            Ev::Heal => self.heal(),
            Ev::Converge => self.converge(),
        }
    }

    /// After every step at node `i`: its cores' invariants, then its next timer.
    fn after(&mut self, i: usize) {
        self.after_step(i, true);
    }

    /// [`World::after`]; `core` says whether the step could have changed the consensus
    /// core (configuration pulls and pings only read it, and are most of a manager's
    /// messages in a large fleet).
    fn after_step(&mut self, i: usize, core: bool) {
        self.drain(i);
        if core && self.topo.is_some() && self.nodes[i].core.is_some() {
            self.observe_topology(i);
        }
        let n = &mut self.nodes[i];
        if n.live() {
            if let Some(c) = n.core.as_ref().filter(|_| core) {
                c.check_invariants();
            }
            // A fetch's check walks every flight of every peer: in fleets past
            // `EVERY_STEP_NODES_MAX` it runs at most once per simulated second per node.
            if self.members <= EVERY_STEP_NODES_MAX || self.now >= n.next_fetch_check {
                n.next_fetch_check = self.now + 1_000;
                for (f, _) in n.fetches.values() {
                    f.check_invariants();
                }
            }
            if self.now >= n.next_dir_check {
                n.next_dir_check = self.now + DIRECTORY_CHECK_MS;
                n.directory.check_invariants();
            }
        }
        self.reschedule(i);
    }

    fn reschedule(&mut self, i: usize) {
        let n = &self.nodes[i];
        if !n.live() {
            return;
        }
        let mut local = n.next_housekeeping.min(n.next_plan);
        if n.kind != Kind::Outsider {
            local = local.min(n.announcer.poll_timeout().0);
        }
        if let Some(c) = &n.core {
            local = local.min(c.poll_timeout().0);
        }
        for (f, _) in n.fetches.values() {
            if let Some(t) = f.poll_timeout() {
                local = local.min(t.0);
            }
        }
        let at = n.global(local).max(self.now);
        if at != n.timer_at && (n.timer_at == u64::MAX || at < n.timer_at || n.timer_at < self.now)
        {
            self.nodes[i].timer_at = at;
            self.push(at, Ev::Timer(i));
        }
    }

    fn fatal(&mut self, i: usize, r: Result<(), FatalError>) {
        match r {
            Ok(()) => {}
            Err(FatalError::Sync(e)) => {
                // A failed fsync: the node must stop (fail-stop), and comes back later.
                self.record("fail-stop", i as u64, 0);
                let _ = e;
                self.crash(i);
                self.nodes[i].backend.fail_syncs(false);
                let at = self.now + 2_000;
                self.push(at, Ev::Fault(Fault::Restart(i)));
            }
            Err(e) => {
                let now = self.now;
                self.checker.fail(now, "safety:raft", format!("node {i}: {e}"));
            }
        }
    }

    // ---- the network ----

    fn blocked(&self, from: usize, to: usize) -> bool {
        self.partitions.values().any(|p| match p {
            Partition::Zones(z) => {
                z.contains(&self.nodes[from].zone_ix) != z.contains(&self.nodes[to].zone_ix)
            }
            Partition::Isolate(x) => *x == from || *x == to,
            Partition::OneWay(a, b) => *a == from && *b == to,
        })
    }

    fn latency(&mut self, from: usize, to: usize) -> (u64, u32) {
        let (za, zb) = (&self.nodes[from].zone, &self.nodes[to].zone);
        let links = &self.sc.links;
        let mut lat = if za == zb { links.same_zone.0 } else { links.cross_zone.0 };
        let mut bw = links.bandwidth_mbps;
        if za != zb
            && let Some(p) = links
                .pairs
                .iter()
                .find(|p| (&p.a == za && &p.b == zb) || (&p.a == zb && &p.b == za))
        {
            lat = p.latency.0;
            bw = p.bandwidth_mbps.unwrap_or(bw).min(bw).max(1);
        }
        let jitter = links.jitter.0;
        if jitter > 0 {
            lat += self.rng.gen_range(0..=jitter);
        }
        if self.mix.reorder_ms > 0 && self.healed_at.is_none() {
            lat += self.rng.gen_range(0..=self.mix.reorder_ms);
        }
        (lat.max(1), bw)
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if from == to {
            return;
        }
        let len = msg.len() as u64;
        self.messages += 1;
        self.bytes += len;
        if self.blocked(from, to) {
            return;
        }
        let faulty = self.healed_at.is_none();
        let (lat, bw) = self.latency(from, to);
        let mut at = self.now + lat;
        if msg.is_stream() {
            // Bulk data queues on the sender's uplink.
            let tx_us = len * 8 / u64::from(bw);
            let start = self.nodes[from].up_busy_us.max(self.now * 1000);
            let done = start + tx_us;
            self.nodes[from].up_busy_us = done;
            at = done.div_ceil(1000) + lat;
            if faulty && self.loss > 0.0 && self.rng.gen_bool(self.loss) {
                at += RETRANSMIT_MS;
            }
            self.push(at, Ev::Deliver { from, to, msg });
            return;
        }
        if faulty && self.loss > 0.0 && self.rng.gen_bool(self.loss) {
            return;
        }
        if faulty && self.mix.dup > 0.0 && self.rng.gen_bool(self.mix.dup) {
            let copy = match &msg {
                Msg::Raft(b) => Some(Msg::Raft(b.clone())),
                Msg::Cluster(b) => Some(Msg::Cluster(b.clone())),
                Msg::Ping(t) => Some(Msg::Ping(*t)),
                _ => None,
            };
            if let Some(c) = copy {
                let (extra, _) = self.latency(from, to);
                self.push(at + extra, Ev::Deliver { from, to, msg: c });
            }
        }
        self.push(at, Ev::Deliver { from, to, msg });
    }

    // ---- node logic: the driver ----

    /// Decodes a pushed configuration. Every push of one manager's encoding at one index
    /// shares one buffer; it is decoded once and the edges that receive it share the result
    /// (1,000 edges holding 1,000-member states each would otherwise take a gigabyte).
    fn is_member(&self, at: usize, who: usize) -> bool {
        self.nodes[at].view().members.contains_key(self.nodes[who].peer.as_bytes())
    }

    /// The newest committed state any manager holds.
    fn latest(&self) -> Option<&ClusterState> {
        self.nodes
            .iter()
            .filter_map(|n| n.core.as_ref().map(|c| c.state()))
            .max_by_key(|s| s.applied_index)
    }

    // ---- workload ----

    // ---- faults ----

    // ---- heal and convergence ----
}

/// A digest of a replication plan's inputs (and the grants that filter them): equal
/// digests give equal plans. Free bytes and loads enter only as far as the plan can see
/// them: with no pin size known, free bytes matter through placement's capacity class
/// alone; with every load below the balancing and overload thresholds, loads matter
/// through placement's load class alone (`mycel_policy::placement::weight`).
fn plan_digest(pins: &[PinSpec], nodes: &[NodeState], view: &ClusterState) -> [u8; 32] {
    let settings = Settings::default();
    let exact_free = pins.iter().any(|p| p.size_bytes != 0);
    let exact_load = nodes
        .iter()
        .any(|n| n.node.load >= settings.balance_min_load || n.node.load > settings.overload);
    let mut h = blake3::Hasher::new();
    let mut put = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for p in pins {
        put(&p.root);
        put(&[p.replicas_min.to_le_bytes(), p.replicas_max.to_le_bytes()].concat());
        put(format!("{:?}{:?}{:?}{}", p.zones, p.tags, p.preposition, p.deadline_ms).as_bytes());
    }
    for n in nodes {
        put(&n.node.id);
        put(n.node.zone.as_bytes());
        put(&(n.node.tags.len() as u64).to_le_bytes());
        for t in &n.node.tags {
            put(t.as_bytes());
        }
        let free = if exact_free {
            n.node.free_bytes
        } else {
            (n.node.free_bytes >> 30).checked_ilog2().map_or(u64::MAX, u64::from)
        };
        put(&free.to_le_bytes());
        let load = if exact_load { n.node.load } else { (n.node.load / 8).min(15) };
        put(&load.to_le_bytes());
        put(&[u8::from(n.storage), u8::from(n.alive)]);
        for (root, held) in &n.holdings {
            put(root);
            match held {
                Held::Complete => put(&[1]),
                // The plan does not read a copy's progress, only that it is under way.
                Held::Partial { .. } => put(&[2]),
            }
        }
    }
    for g in &view.grants {
        put(format!("{}|{}|{}", g.subject, g.permission, g.namespace).as_bytes());
    }
    *h.finalize().as_bytes()
}

fn cid_ok(c: &Cid, b: &[u8]) -> bool {
    c.matches(b)
}
