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

mod disk;
mod grants;
mod routers;

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

    fn schedule_workload(&mut self) {
        let w = self.sc.workload.clone();
        let d = self.end_faulty;
        let lo = 3_000.min(d / 4);
        let hi = (d * 6 / 10).max(lo + 1);
        for k in 0..w.objects {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Publish(k));
        }
        for k in 0..w.prepositions {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Preposition(k));
        }
        for k in 0..w.grants {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Grant(k));
        }
        for _ in 0..w.curious_fetches {
            let at = self.rng.gen_range(hi / 2..hi.max(hi / 2 + 1) + d / 4);
            self.push(at.min(d), Ev::Curious);
        }
        for i in self.members..self.nodes.len() {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Outsider(i));
        }
        if self.topo.is_some() {
            let t = self.sc.topology.clone();
            for k in 0..t.versions {
                let at = self.rng.gen_range(lo..d.max(lo + 1));
                self.push(at, Ev::TopologyPropose(k));
            }
            for _ in 0..t.rollbacks {
                let at = self.rng.gen_range(hi / 2..d.max(hi / 2 + 1));
                self.push(at, Ev::TopologyRollback);
            }
        }
    }

    fn schedule_faults(&mut self) {
        let d = self.end_faulty;
        let timeline = self.sc.faults.timeline.clone();
        let mut next_version = self.sc.topology.versions;
        for step in &timeline {
            // Topology changes at chosen moments (a partition, a manager down).
            match step.action.as_str() {
                "topology-propose" if self.topo.is_some() => {
                    self.push(step.at.0, Ev::TopologyPropose(next_version));
                    next_version += 1;
                }
                "topology-rollback" if self.topo.is_some() => {
                    self.push(step.at.0, Ev::TopologyRollback);
                }
                _ => {}
            }
            if let Some(f) = self.scripted(step) {
                self.push(step.at.0, Ev::Fault(f));
            }
        }
        if self.sc.faults.mode != FaultMode::Swarm {
            return;
        }
        let minutes = d as f64 / 60_000.0;
        let start = 2_000.min(d / 4);
        let mix = self.mix.clone();
        let count = |rng: &mut ChaCha8Rng, rate: f64| -> u64 {
            let x = rate * minutes;
            x.floor() as u64 + u64::from(rng.gen_bool(x.fract()))
        };
        for _ in 0..count(&mut self.rng, mix.crashes_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            let after = self.rng.gen_range(50..15_000);
            let role = if self.rng.gen_bool(0.5) { Some(Kind::Manager) } else { None };
            self.push(at, Ev::Fault(Fault::Crash { restart_after: Some(after), role, node: None }));
        }
        for _ in 0..count(&mut self.rng, mix.pauses_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            let len = self.rng.gen_range(200..8_000);
            self.push(at, Ev::Fault(Fault::Pause(None, len)));
        }
        for _ in 0..count(&mut self.rng, mix.partitions_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            let len = self.rng.gen_range(1_000..20_000);
            self.push(at, Ev::Fault(Fault::Partition(None, len)));
        }
        let flips = count(&mut self.rng, mix.bitflips_per_min);
        self.bitflips_left = flips as u32;
        for _ in 0..flips {
            let at = self.rng.gen_range(start..d.max(start + 1));
            self.push(at, Ev::Fault(Fault::BitFlip));
        }
        for _ in 0..count(&mut self.rng, mix.fsync_failures_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            self.push(at, Ev::Fault(Fault::FsyncFail));
        }
    }

    fn scripted(&mut self, s: &Step) -> Option<Fault> {
        let node = s.node.map(|n| n as usize);
        let role = match s.role.as_deref() {
            Some("manager") => Some(Kind::Manager),
            Some("edge") => Some(Kind::Edge),
            Some("router") => Some(Kind::Router),
            _ => None,
        };
        let len = s.duration.map_or(5_000, |d| d.0);
        Some(match s.action.as_str() {
            "crash" => Fault::Crash { restart_after: Some(len), role, node },
            "kill" => Fault::Crash { restart_after: None, role, node },
            "restart" => Fault::Restart(node?),
            "pause" => Fault::Pause(node, len),
            "isolate" => match node {
                Some(n) => Fault::Partition(Some(Partition::Isolate(n)), len),
                None => Fault::IsolateRole(role, len),
            },
            "one-way" => Fault::Partition(Some(Partition::OneWay(node?, s.to? as usize)), len),
            "partition-zones" => {
                let set: BTreeSet<usize> =
                    s.zones.iter().filter_map(|z| self.zones.iter().position(|x| x == z)).collect();
                Fault::Partition(Some(Partition::Zones(set)), len)
            }
            "loss" => Fault::Loss(s.rate.unwrap_or(0.05)),
            "heal" => Fault::HealAll,
            _ => return None,
        })
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

    fn on_timer(&mut self, i: usize) {
        let local = self.nodes[i].local(self.now);
        if let Some(c) = self.nodes[i].core.as_mut()
            && c.poll_timeout().0 <= local
        {
            let r = c.handle_timeout(CoreTime(local));
            self.fatal(i, r);
        }
        if !self.nodes[i].live() {
            return;
        }
        if self.nodes[i].kind != Kind::Outsider && self.nodes[i].announcer.poll_timeout().0 <= local
        {
            self.check_claims(i);
            let holdings = self.holdings(i);
            if let Some(a) = self.nodes[i].announcer.handle_timeout(Timestamp(local), &holdings) {
                self.announce(i, &a);
            }
        }
        let due: Vec<Cid> = self.nodes[i]
            .fetches
            .iter()
            .filter(|(_, (f, _))| f.poll_timeout().is_some_and(|t| t.0 <= local))
            .map(|(c, _)| *c)
            .collect();
        for root in due {
            if let Some((f, _)) = self.nodes[i].fetches.get_mut(&root) {
                f.handle_timeout(Timestamp(local));
            }
        }
        if self.nodes[i].next_housekeeping <= local {
            self.nodes[i].next_housekeeping = local + HOUSEKEEPING_MS;
            self.housekeeping(i, local);
        }
        if self.nodes[i].next_plan <= local {
            self.nodes[i].next_plan = local + self.sc.plan_period.0;
            self.replication_plan(i, local);
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

    fn holdings(&self, i: usize) -> Holdings {
        let n = &self.nodes[i];
        let used: u64 = n.store.values().map(|b| b.len() as u64).sum();
        Holdings {
            complete: n.complete.iter().copied().collect(),
            partial: n
                .fetches
                .iter()
                .filter(|(_, (_, p))| *p == Purpose::Replica)
                .map(|(root, (f, _))| {
                    let p = f.progress();
                    Partial {
                        root: root.to_bytes(),
                        done_bytes: p.done_bytes,
                        total_bytes: p.total_bytes,
                    }
                })
                .take(mycel_proto::wire::ANNOUNCE_PARTIAL_MAX)
                .collect(),
            load: n.fetches.len() as u32,
            free_bytes: CAPACITY_BYTES.saturating_sub(used),
            addrs: Vec::new(),
        }
    }

    fn announce(&mut self, i: usize, a: &Announcement) {
        let bytes = Rc::new(a.encode());
        self.messages += 1;
        self.bytes += bytes.len() as u64;
        self.record("announce", i as u64, a.seq);
        // Gossip: one delivery event per publish; the mesh carries it to every member.
        let lat = self.sc.links.cross_zone.0.max(self.sc.links.same_zone.0) + 5;
        self.push(self.now + lat, Ev::Gossip { from: i, bytes });
    }

    fn on_gossip(&mut self, from: usize, bytes: &[u8]) {
        let Ok(a) = Announcement::decode(bytes) else {
            let now = self.now;
            self.checker.fail(
                now,
                "safety:announce",
                format!("node {from} published an undecodable announcement"),
            );
            return;
        };
        let faulty = self.healed_at.is_none();
        let peer = self.nodes[from].peer;
        for to in 0..self.members {
            if to == from || !self.nodes[to].live() || self.nodes[to].paused_until > self.now {
                continue;
            }
            if self.blocked(from, to) || (faulty && self.loss > 0.0 && self.rng.gen_bool(self.loss))
            {
                continue;
            }
            let local = self.nodes[to].local(self.now);
            let _ = self.nodes[to].directory.handle_announcement(peer, &a, Timestamp(local));
        }
        self.record("gossip", from as u64, a.seq);
    }

    fn housekeeping(&mut self, i: usize, local: u64) {
        // Group commit: what was fetched is durable every few rounds (and before the node
        // claims an object).
        if (local / HOUSEKEEPING_MS).is_multiple_of(STORE_SYNC_ROUNDS) {
            self.sync_store(i);
        }
        let n = &mut self.nodes[i];
        if (local / HOUSEKEEPING_MS).is_multiple_of(5) {
            // Expiry walks every holder of every root: every few seconds is enough.
            n.directory.expire(Timestamp(local));
        }
        n.banned.retain(|_, until| *until > local);
        if n.kind == Kind::Outsider {
            return;
        }
        // Follow the committed configuration from the managers, as the daemon does.
        let managers: Vec<PeerId> =
            self.manager_nodes(i).into_iter().map(|j| self.nodes[j].peer).collect();
        for (to, frame) in self.nodes[i].follower.poll_requests(Timestamp(local), &managers) {
            if let Some(&j) = self.by_peer.get(&to) {
                self.send(i, j, Msg::Cluster(frame.encode()));
            }
        }
        // An edge the configuration made a manager starts its consensus core (it waits to
        // be added by the leader); the core then follows the log.
        if self.nodes[i].core.is_none()
            && self.nodes[i]
                .view()
                .member_by_raft_id(self.nodes[i].raft_id)
                .is_some_and(|m| m.role == Role::Manager)
        {
            self.start_core(i, Vec::new());
        }
        // Mesh pings from nodes running a core, to managers and eligible members.
        if self.nodes[i].core.is_some() {
            let targets: Vec<usize> = self.nodes[i]
                .view()
                .members
                .values()
                .filter(|m| m.role == Role::Manager || m.tags.iter().any(|t| t == ELIGIBLE_TAG))
                .map(|m| m.raft_id as usize - 1)
                .filter(|&j| j != i && j < self.members)
                .collect();
            for j in targets {
                self.send(i, j, Msg::Ping(local));
            }
        }
        // The operator's `cluster init` is retried at the first manager until it is applied.
        if i == 0
            && !self.initialised
            && self.nodes[0].outstanding.is_none()
            && self.nodes[0].proposals.is_empty()
        {
            let init = self.init.clone();
            self.nodes[0].proposals.push_back((init, Vec::new()));
        }
        // Proposals: the client sends again what is due, or the next one starts.
        let targets = self.targets(i);
        let n = &mut self.nodes[i];
        n.client.handle_timeout(n.core.as_mut(), &targets, Timestamp(local));
        self.drain_client(i);
        self.pump(i);
        // Curious fetches give up.
        let stale: Vec<Cid> = self.nodes[i]
            .fetches
            .iter()
            .filter(|(_, (_, p))| matches!(p, Purpose::Curious(t) if *t + CURIOUS_MS <= local))
            .map(|(c, _)| *c)
            .collect();
        for c in stale {
            self.nodes[i].fetches.remove(&c);
        }
        if self.topo.is_some() {
            self.router_tick(i, local);
            self.manager_topology_tick(i, local);
        }
    }

    /// Managers as node indexes, from `i`'s view (the bootstrap managers before it has one).
    fn manager_nodes(&self, i: usize) -> Vec<usize> {
        let v = self.nodes[i].view();
        let mut out: Vec<usize> = if v.members.is_empty() {
            (0..self.sc.managers as usize).collect()
        } else {
            v.members
                .values()
                .filter(|m| m.role == Role::Manager)
                .map(|m| m.raft_id as usize - 1)
                .filter(|&j| j < self.members)
                .collect()
        };
        out.retain(|&j| j != i);
        out.sort_unstable();
        out
    }

    fn pump(&mut self, i: usize) {
        if self.nodes[i].outstanding.is_some() {
            return;
        }
        let Some((commands, pins)) = self.nodes[i].proposals.pop_front() else { return };
        let init = matches!(commands.first(), Some(Command::InitCluster { .. }));
        let targets = self.targets(i);
        let n = &mut self.nodes[i];
        let local = n.local(self.now);
        let seq = n.client.propose(commands, n.core.as_mut(), &targets, Timestamp(local));
        n.outstanding = Some(Outstanding { seq, pins, init });
        self.record("propose", i as u64, seq);
        self.drain_client(i);
    }

    /// Whom node `i`'s proposals can go to: the leader its core knows, else the managers of
    /// its view (simulated nodes reach every member; partitions drop what cannot arrive).
    fn targets(&self, i: usize) -> Targets {
        let n = &self.nodes[i];
        let leader =
            n.core.as_ref().and_then(|c| Targets::leader_in(n.view(), c.leader(), &n.peer));
        let managers = self.manager_nodes(i).into_iter().map(|j| self.nodes[j].peer).collect();
        Targets { leader, managers, bootstrap: Vec::new() }
    }

    /// Carries out node `i`'s cluster client outputs: frames through the real codec, and
    /// settled proposals.
    fn drain_client(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].client.poll_output() {
            match out {
                ClientOutput::Send { to, frame } => {
                    if let Some(&j) = self.by_peer.get(&to) {
                        self.send(i, j, Msg::Cluster(frame.encode()));
                    }
                }
                ClientOutput::Resolved { seq, result } => {
                    let applied = matches!(result, Ok((_, Outcome::Applied)));
                    self.on_ack(i, seq, applied);
                }
            }
        }
    }

    /// A cluster frame from node `from` arrives at node `to`.
    fn on_cluster_frame(&mut self, from: usize, to: usize, bytes: &[u8]) {
        let frame = match bytes.get(..4).map(|p| p.try_into().expect("4 bytes")) {
            Some(prefix) if ClusterFrame::check_len(prefix).is_ok() => {
                ClusterFrame::decode(&bytes[4..])
            }
            _ => return,
        };
        let Ok(frame) = frame else { return };
        let peer = self.nodes[from].peer;
        // Membership as the daemon's gate knows it: the committed members, and before the
        // cluster exists, the bootstrap managers (the daemon's `[cluster] members`).
        let bootstrapping = self.nodes[to].view().members.is_empty()
            && from < self.sc.managers as usize
            && to < self.sc.managers as usize;
        let member = bootstrapping || self.is_member(to, from);
        let n = &mut self.nodes[to];
        match frame {
            ClusterFrame::Propose { req, proposal } => {
                n.client.handle_propose(peer, member, req, proposal, n.core.as_mut());
            }
            ClusterFrame::Proposed { req, index, applied, reason } => {
                n.client.handle_proposed(peer, req, index, applied, reason);
            }
            ClusterFrame::NotLeader { req, leader } => {
                n.client.handle_not_leader(peer, req, &leader);
            }
            ClusterFrame::Follow { since } => {
                if !member {
                    return;
                }
                let frame = follow::answer(n.core.as_ref(), n.view(), since, &FOLLOW);
                self.send(to, from, Msg::Cluster(frame.encode()));
                return;
            }
            ClusterFrame::Entries { entries } => {
                // Refusals (an answer nobody asked for, a gap) change nothing.
                let _ = n.follower.handle_entries(&peer, &entries);
                return;
            }
            ClusterFrame::State { applied, state } => {
                let _ = n.follower.handle_state(&peer, applied, &state);
                return;
            }
            // The simulator carries Raft messages and reports as messages of their own (yet).
            _ => {}
        }
        self.drain_client(to);
    }

    fn drain(&mut self, i: usize) {
        loop {
            let mut progressed = false;
            while let Some(out) = self.nodes[i].core.as_mut().and_then(|c| c.poll_output()) {
                progressed = true;
                self.on_output(i, out);
                if !self.nodes[i].live() {
                    return;
                }
            }
            let roots: Vec<Cid> = self.nodes[i].fetches.keys().copied().collect();
            for root in roots {
                let local = self.nodes[i].local(self.now);
                while let Some(a) = self.nodes[i]
                    .fetches
                    .get_mut(&root)
                    .and_then(|(f, _)| f.poll_action(Timestamp(local)))
                {
                    progressed = true;
                    self.on_fetch_action(i, root, a);
                    if !self.nodes[i].live() {
                        return;
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn on_output(&mut self, i: usize, out: Output) {
        let now = self.now;
        match out {
            Output::Send { to, msg } => {
                let vote = self.checker.on_raft_send(now, &msg);
                if vote
                    && self.healed_at.is_none()
                    && self.mix.vote_crash > 0.0
                    && self.rng.gen_bool(self.mix.vote_crash)
                {
                    // A chosen crash point: right after the vote is persisted; half the time
                    // before the answer leaves.
                    if self.rng.gen_bool(0.5) && to >= 1 && (to as usize) <= self.members {
                        self.send(i, to as usize - 1, Msg::Raft(msg));
                    }
                    self.crash(i);
                    self.fault("crash-after-vote", i as u64);
                    let at = self.now + self.rng.gen_range(10..100);
                    self.push(at, Ev::Fault(Fault::Restart(i)));
                    return;
                }
                if to >= 1 && (to as usize) <= self.members {
                    self.send(i, to as usize - 1, Msg::Raft(msg));
                }
            }
            Output::Applied { index, from, seq, outcome } => {
                self.nodes[i].client.handle_applied(index, &from, seq, &outcome);
                self.checker.on_applied(now, i, index, (from, seq, outcome));
                self.drain_client(i);
            }
            Output::ReadReady { .. } => {}
            Output::RoleChanged { term, leader, leading } => {
                self.record("role", i as u64, term << 16 | leader);
                if leading {
                    self.checker.on_leader(now, term, i);
                }
            }
            Output::StoreBlocks(blocks) => {
                let root = blocks.last().map(|(c, _)| *c);
                for (cid, bytes) in blocks {
                    self.store(i, cid, &bytes);
                }
                if let Some(r) = root {
                    self.nodes[i].complete.insert(r);
                }
            }
            Output::NeedState(cid) => {
                let local = self.nodes[i].local(now);
                let mut f = Fetch::new(cid, FetchConfig::default(), Timestamp(local));
                for j in self.manager_nodes(i) {
                    let same = self.nodes[j].zone == self.nodes[i].zone;
                    f.add_peer(self.nodes[j].peer, same);
                }
                self.nodes[i].fetches.insert(cid, (f, Purpose::State));
            }
            Output::Propose(commands) => {
                self.nodes[i].proposals.push_back((commands, Vec::new()));
                self.pump(i);
            }
            Output::ReportRtt { to, mean_rtt_ms } => {
                if to >= 1 && (to as usize) <= self.members {
                    self.send(i, to as usize - 1, Msg::Report(mean_rtt_ms));
                }
            }
        }
    }

    fn on_ack(&mut self, i: usize, seq: u64, applied: bool) {
        let Some(o) = &self.nodes[i].outstanding else { return };
        if o.seq != seq {
            return;
        }
        let o = self.nodes[i].outstanding.take().expect("checked");
        self.record("ack", i as u64, seq);
        if i == 0 && o.init {
            // Applied, or rejected as already initialised: either way the cluster exists.
            self.initialised = true;
        }
        if applied {
            self.checker.acked.insert((self.nodes[i].peer.as_bytes().to_vec(), seq));
            for p in o.pins {
                self.acked_pins.insert(p);
            }
        }
        self.pump(i);
    }

    /// Stores a block at node `i`: the checker sees every write.
    fn store(&mut self, i: usize, cid: Cid, bytes: &[u8]) {
        let valid = cid.matches(bytes);
        if !valid {
            let now = self.now;
            self.checker.fail(
                now,
                "safety:store-matches-cid",
                format!("node {i} stored a block that does not match {cid}"),
            );
        }
        let b = self.pool.intern(cid, bytes, valid);
        self.nodes[i].store.insert(cid, b);
    }

    /// Reads a block back, verifying it (a corrupt copy is dropped, as the store does).
    fn read_block(&mut self, i: usize, cid: &Cid) -> Option<Rc<[u8]>> {
        let b = self.nodes[i].store.get(cid)?.clone();
        if cid.matches(&b) {
            return Some(b);
        }
        self.record("corrupt-dropped", i as u64, 0);
        self.nodes[i].store.remove(cid);
        let holders: Vec<Cid> = self.nodes[i].complete.iter().copied().collect();
        // The roots that used this block are no longer complete here.
        for r in holders {
            if content::object_blocks(&self.nodes[i].store, &r).is_none() {
                self.nodes[i].complete.remove(&r);
            }
        }
        None
    }

    fn on_fetch_action(&mut self, i: usize, root: Cid, a: Action) {
        match a {
            Action::Lookup { cid, need_bytes } => {
                let local = match self.read_block(i, &cid) {
                    None => Local::Absent,
                    Some(b) if need_bytes => Local::Bytes(b.to_vec()),
                    Some(_) => Local::Present,
                };
                if let Some((f, _)) = self.nodes[i].fetches.get_mut(&root) {
                    f.handle_local(cid, local);
                }
            }
            Action::Request { peer, req, root: r, cids } => {
                let Some(&to) = self.by_peer.get(&peer) else { return };
                let frame = Frame::Want {
                    req,
                    root: r.to_bytes(),
                    cids: cids.iter().map(Cid::to_bytes).collect(),
                };
                self.send(i, to, Msg::Frame { root, bytes: frame.encode() });
            }
            Action::Store { cid, bytes, from } => {
                let _ = from;
                self.store_fetched(i, root, cid, &bytes);
            }
            Action::Penalize { peer, reason, disconnect } => {
                self.record("penalize", i as u64, reason as u64);
                if disconnect {
                    self.disconnect(i, peer);
                }
            }
            Action::WhoHas { root: r } => {
                let mut cands: Vec<usize> = self.nodes[i]
                    .view()
                    .members
                    .values()
                    .map(|m| m.raft_id as usize - 1)
                    .filter(|&j| j != i && j < self.members)
                    .collect();
                cands.shuffle(&mut self.rng);
                for j in cands.into_iter().take(8) {
                    let frame = Frame::WhoHas { req: 0, root: r.to_bytes() };
                    self.send(i, j, Msg::Frame { root, bytes: frame.encode() });
                }
            }
            Action::Complete { root: r, .. } => {
                let purpose = self.nodes[i].fetches.remove(&r).map(|(_, p)| p);
                self.record("complete", i as u64, 0);
                // The store syncs before the node claims anything it fetched.
                self.sync_store(i);
                match purpose {
                    Some(Purpose::State) => {
                        if let Some(bytes) = content::read_file(&self.nodes[i].store, &r) {
                            self.nodes[i].complete.insert(r);
                            let res = self.nodes[i]
                                .core
                                .as_mut()
                                .map_or(Ok(()), |c| c.handle_snapshot_state(r, &bytes));
                            self.fatal(i, res);
                        }
                    }
                    Some(p @ (Purpose::Replica | Purpose::Curious(_) | Purpose::Topology))
                        if content::object_blocks(&self.nodes[i].store, &r).is_some() =>
                    {
                        if matches!(p, Purpose::Curious(_)) {
                            self.granted_reads += 1;
                        }
                        self.nodes[i].complete.insert(r);
                        let local = self.nodes[i].local(self.now);
                        self.nodes[i].announcer.announce_soon(Timestamp(local));
                    }
                    _ => {
                        // The fetch ended without the object (a block's write failed): the
                        // plan's inputs may be back to what they were when it asked for the
                        // fetch, so it must run again rather than be skipped as unchanged.
                        self.nodes[i].last_plan = None;
                    }
                }
            }
            Action::Failed { root: r, reason } => {
                let now = self.now;
                self.nodes[i].fetches.remove(&r);
                self.checker.fail(
                    now,
                    "safety:manifest",
                    format!("node {i} could not read the manifest of {r}: {reason}"),
                );
            }
        }
    }

    fn disconnect(&mut self, i: usize, peer: PeerId) {
        let until = self.nodes[i].local(self.now) + BAN_MS;
        self.nodes[i].banned.insert(peer, until);
        for (f, _) in self.nodes[i].fetches.values_mut() {
            f.peer_gone(&peer);
        }
    }

    fn on_message(&mut self, from: usize, to: usize, msg: Msg) {
        let local = self.nodes[to].local(self.now);
        match msg {
            Msg::Raft(b) => {
                if let Some(c) = self.nodes[to].core.as_mut() {
                    let r = c.step(&b);
                    self.fatal(to, r);
                }
            }
            Msg::Cluster(bytes) => self.on_cluster_frame(from, to, &bytes),
            Msg::Ping(t) => self.send(to, from, Msg::Pong(t)),
            Msg::Pong(t) => {
                let rtt = local.saturating_sub(t);
                let id = self.nodes[from].raft_id;
                if let Some(c) = self.nodes[to].core.as_mut() {
                    c.handle_rtt(id, rtt, CoreTime(local));
                }
            }
            Msg::Report(mean) => {
                let id = self.nodes[from].raft_id;
                if let Some(c) = self.nodes[to].core.as_mut() {
                    c.handle_rtt_report(id, mean, CoreTime(local));
                }
            }
            Msg::Frame { root, bytes } => self.on_frame(from, to, root, &bytes, local),
            Msg::Topology(r) => {
                if self.nodes[to].core.is_some() && self.is_member(to, from) {
                    self.nodes[to].reports.insert(from, (local, r));
                }
            }
        }
    }

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

    fn on_frame(&mut self, from: usize, to: usize, root: Cid, bytes: &[u8], local: u64) {
        let peer = self.nodes[from].peer;
        let reset = |w: &mut World| {
            // A bad frame resets the stream: the sender is dropped from this node's fetches.
            w.record("reset", from as u64, to as u64);
            w.disconnect(to, peer);
        };
        if bytes.len() < 4 {
            return reset(self);
        }
        let prefix: [u8; 4] = bytes[..4].try_into().expect("4 bytes");
        if Frame::check_len(prefix).is_err() {
            return reset(self);
        }
        let Ok(frame) = Frame::decode(&bytes[4..]) else {
            return reset(self);
        };
        if std::env::var("MYCEL_SIM_DEBUG")
            .is_ok_and(|d| d == from.to_string() || d == to.to_string())
        {
            let desc = match &frame {
                Frame::Want { cids, .. } => format!("want {}", cids.len()),
                Frame::Block { cid, .. } => format!(
                    "block {:?}",
                    mycel_proto::wire::cid(cid).map(|c| c.to_string()[50..].to_string())
                ),
                Frame::DontHave { cid, .. } => format!(
                    "donthave {:?}",
                    mycel_proto::wire::cid(cid).map(|c| c.to_string()[50..].to_string())
                ),
                Frame::Refused { reason, .. } => format!("refused {reason}"),
                Frame::WhoHas { .. } => "whohas".into(),
                Frame::Holding { complete, .. } => format!("holding {complete}"),
                Frame::Namespace { namespace, .. } => format!("namespace {namespace}"),
            };
            eprintln!("{} {from}->{to} {} {desc}", self.now, &root.to_string()[50..]);
        }
        match frame {
            Frame::Want { req, root: r, cids } => self.serve(from, to, root, req, r, cids),
            Frame::WhoHas { req, root: r } => {
                if !self.is_member(to, from) {
                    return;
                }
                let Ok(rc) = mycel_proto::wire::cid(&r) else { return };
                self.check_claims(to);
                let complete = self.nodes[to].complete.contains(&rc);
                if complete || self.nodes[to].fetches.contains_key(&rc) {
                    let f = Frame::Holding { req, root: r, complete };
                    self.send(to, from, Msg::Frame { root, bytes: f.encode() });
                }
            }
            Frame::Holding { root: r, complete, .. } => {
                let Ok(rc) = mycel_proto::wire::cid(&r) else { return };
                self.nodes[to].directory.handle_holding(peer, rc, complete, Timestamp(local));
                let same = self.nodes[from].zone == self.nodes[to].zone;
                let banned = self.nodes[to].banned.contains_key(&peer);
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&rc)
                    && !banned
                {
                    // Workaround for a fetch-core limitation (regression test
                    // `fetch_forgets_dont_have_of_a_complete_holder`): a `DontHave` is remembered
                    // for the whole fetch, so a complete holder that once failed a read would
                    // never be asked again. Re-adding the peer clears what it lacked.
                    if complete && f.peers().any(|p| *p == peer) {
                        f.peer_gone(&peer);
                    }
                    f.add_peer(peer, same);
                }
            }
            Frame::Block { cid, bytes: b, .. } => {
                if self.nodes[to].kind == Kind::Outsider {
                    let now = self.now;
                    self.checker.fail(
                        now,
                        "safety:non-member-content",
                        format!("outsider {to} received a block from node {from}"),
                    );
                    return;
                }
                let Ok(c) = mycel_proto::wire::cid(&cid) else { return reset(self) };
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&root) {
                    f.handle_block(peer, c, b, Timestamp(local));
                }
            }
            Frame::DontHave { cid, .. } => {
                let Ok(c) = mycel_proto::wire::cid(&cid) else { return reset(self) };
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&root) {
                    f.handle_dont_have(peer, c);
                }
            }
            Frame::Refused { .. } => {
                self.record("refused", from as u64, to as u64);
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&root) {
                    f.handle_refused(peer);
                }
            }
            // Simulated content is namespaced by its committed pins only (no unpinned
            // `add --namespace`), so no simulated holder sends this.
            Frame::Namespace { .. } => {}
        }
    }

    /// The serving side of the exchange at node `s` for requester `f`.
    fn serve(
        &mut self,
        f: usize,
        s: usize,
        stream: Cid,
        req: u64,
        root: [u8; 36],
        cids: Vec<[u8; 36]>,
    ) {
        let refuse = |w: &mut World, reason: &str| {
            let fr = Frame::Refused { req, reason: reason.into() };
            w.send(s, f, Msg::Frame { root: stream, bytes: fr.encode() });
        };
        let fpeer = self.nodes[f].peer;
        if !self.is_member(s, f) {
            return refuse(self, &Refusal::NotMember.to_string());
        }
        let Ok(root_cid) = mycel_proto::wire::cid(&root) else { return refuse(self, "bad root") };
        // The same check the daemon's exchange makes (no local namespaces here: simulated
        // content is namespaced by its committed pins only).
        let verdict = core_access::check_read(self.nodes[s].view(), &fpeer, &root_cid, None);
        let allowed_here = verdict.is_ok();
        let skip_grant =
            cfg!(feature = "sim-bugs") && self.bugs & crate::bugs::SERVE_WITHOUT_GRANT != 0;
        if let Err(refusal) = verdict
            && !skip_grant
        {
            return refuse(self, &refusal.to_string());
        }
        let hostility = self.nodes[s].hostility;
        if hostility == Hostility::Oversized {
            let mut junk = ((FRAME_BYTES_MAX as u32) + 1).to_le_bytes().to_vec();
            junk.extend_from_slice(&[0; 16]);
            self.send(s, f, Msg::Frame { root: stream, bytes: junk });
            return;
        }
        let read_error = if self.healed_at.is_none() { self.mix.read_error } else { 0.0 };
        for c in cids {
            let Ok(cid) = mycel_proto::wire::cid(&c) else { continue };
            let in_tree = {
                let n = &self.nodes[s];
                n.trees.contains(&DiskBlocks(&n.store), &root_cid, &cid)
            };
            let skip_tree =
                cfg!(feature = "sim-bugs") && self.bugs & crate::bugs::SERVE_OUTSIDE_TREE != 0;
            if !in_tree && !skip_tree {
                let refusal = Refusal::NotInTree { cid, root: root_cid };
                return refuse(self, &refusal.to_string());
            }
            let block = if read_error > 0.0 && self.rng.gen_bool(read_error) {
                self.fault("read-error", s as u64);
                None
            } else {
                self.read_block(s, &cid)
            };
            let frame = match block {
                None => Frame::DontHave { req, cid: c },
                Some(b) => {
                    let mut bytes = b.to_vec();
                    if hostility == Hostility::Corrupt
                        && cid.codec() == mycel_chunker::Codec::Raw
                        && !bytes.is_empty()
                    {
                        bytes[0] ^= 0x5a;
                    }
                    // The root manifest of a pin the requester may not read, served under
                    // another root: what the tree check exists to stop.
                    if cid != root_cid {
                        self.check_pin_root_served(s, f, &cid, &root_cid);
                    }
                    // An honest node serves only what `read_block` verified against the CID.
                    if !allowed_here {
                        let latest_ok = self.latest().is_some_and(|st| {
                            core_access::check_read(st, &fpeer, &root_cid, None).is_ok()
                        });
                        let ns = core_access::namespace(self.nodes[s].view(), &root_cid, None)
                            .to_string();
                        if self.served_after_revocation(f, &ns) {
                            let now = self.now;
                            self.checker.fail(
                                now,
                                "safety:served-after-revocation",
                                format!("node {s} served {root_cid} of {ns} to node {f} after the revocation of its grant committed there"),
                            );
                        } else if !latest_ok {
                            let now = self.now;
                            self.checker.fail(
                                now,
                                "safety:read-grant",
                                format!("node {s} served {root_cid} to node {f}, which holds no read grant for it"),
                            );
                        }
                    }
                    Frame::Block { req, cid: c, bytes }
                }
            };
            self.send(s, f, Msg::Frame { root: stream, bytes: frame.encode() });
        }
    }

    /// Checks a block `s` serves to `f` under `root`: if it is the root of a pin in a namespace
    /// `f` may not read (in the newest committed state), it must not leave `s`.
    fn check_pin_root_served(&mut self, s: usize, f: usize, cid: &Cid, root: &Cid) {
        let Some(latest) = self.latest() else { return };
        let Some(pin) = latest.pins.get(cid.to_bytes().as_slice()) else { return };
        let ns = pin.namespace.clone();
        if core_access::may_read_namespace(latest, &self.nodes[f].peer, &ns)
            || self.served_after_revocation(f, &ns)
        {
            return;
        }
        let now = self.now;
        self.checker.fail(
            now,
            "safety:read-grant",
            format!("node {s} served the manifest of {cid} (namespace {ns}) to node {f} under {root}, which node {f} may read"),
        );
    }

    /// The replication plan of node `i` (mycel-policy), and the fetches it asks for.
    fn replication_plan(&mut self, i: usize, local: u64) {
        let n = &self.nodes[i];
        // Storage follows the committed role, not how the node started: a replaced manager
        // becomes an edge.
        if n.kind == Kind::Outsider {
            return;
        }
        let view = n.view();
        let me = n.peer.as_bytes().to_vec();
        let Some(my_member) = view.members.get(&me) else { return };
        if my_member.role != Role::Edge || view.pins.is_empty() {
            self.refresh_peers(i);
            return;
        }
        if n.hostility != Hostility::Honest {
            // A hostile member collects every pin it may read, to be asked for it as often
            // as possible (and then serve it corrupt or oversized).
            let roots: Vec<Cid> = view
                .pins
                .keys()
                .filter_map(|r| Cid::from_bytes(r).ok())
                .filter(|r| core_access::check_read(view, &n.peer, r, None).is_ok())
                .filter(|r| !n.complete.contains(r) && !n.fetches.contains_key(r))
                .collect();
            for c in roots {
                let f = Fetch::new(c, FetchConfig::default(), Timestamp(local));
                self.nodes[i].fetches.insert(c, (f, Purpose::Replica));
            }
            self.refresh_peers(i);
            return;
        }
        let alive_ms = 3 * self.sc.announce_period.0;
        let pins: Vec<PinSpec> = mycel_core::replicate::pin_specs(view, &|_| 0);
        let roots: Vec<Cid> = view.pins.keys().filter_map(|r| Cid::from_bytes(r).ok()).collect();
        let mut holdings: BTreeMap<PeerId, BTreeMap<Vec<u8>, Held>> = BTreeMap::new();
        for r in &roots {
            let root = r.to_bytes().to_vec();
            for (peer, complete) in n.directory.holders_of(r) {
                let held =
                    if complete { Held::Complete } else { Held::Partial { done: 0, total: 0 } };
                holdings.entry(peer).or_default().insert(root.clone(), held);
            }
        }
        let mine = holdings.entry(n.peer).or_default();
        mine.clear();
        for r in &roots {
            if n.complete.contains(r) {
                mine.insert(r.to_bytes().to_vec(), Held::Complete);
            } else if let Some((f, _)) = n.fetches.get(r) {
                let p = f.progress();
                mine.insert(
                    r.to_bytes().to_vec(),
                    Held::Partial { done: p.done_bytes, total: p.total_bytes },
                );
            }
        }
        let nodes: Vec<NodeState> = view
            .members
            .values()
            .filter_map(|m| {
                let peer = PeerId::from_bytes(&m.peer)?;
                let info = n.directory.node(&peer);
                let alive = peer == n.peer
                    || info.is_some_and(|x| local.saturating_sub(x.seen.0) <= alive_ms);
                Some(NodeState {
                    node: Candidate {
                        id: m.peer.clone(),
                        zone: m.zone.clone(),
                        tags: m.tags.clone(),
                        free_bytes: info.map_or(CAPACITY_BYTES, |x| x.free_bytes),
                        load: info.map_or(0, |x| x.load),
                        rtt_ms: None,
                    },
                    storage: m.role == Role::Edge,
                    alive,
                    holdings: holdings.remove(&peer).unwrap_or_default(),
                })
            })
            .collect();
        // The plan is a pure function of its inputs: with the same inputs as last time it
        // would ask for the same actions, already carried out, so it is not run again (a
        // digest of the inputs is kept; this is what lets 1,000 nodes plan on one core).
        let digest = plan_digest(&pins, &nodes, view);
        if n.last_plan == Some(digest) {
            self.plans.1 += 1;
            return;
        }
        self.plans.0 += 1;
        // As the daemon does: one plan per namespace, with only the nodes that may read it
        // counted as storage.
        let namespace_of = |spec: &PinSpec| {
            view.pins
                .get(&spec.root)
                .map_or(access::DEFAULT_NAMESPACE.to_string(), |p| p.namespace.clone())
        };
        // (Every node planned over is a member, so the default namespace needs no lookup.)
        let mut may_read = |id: &[u8], ns: &str| {
            access::open_to_members(ns, access::Permission::Read)
                || PeerId::from_bytes(id)
                    .is_some_and(|p| core_access::may_read_namespace(view, &p, ns))
        };
        let p = plan::plan_namespaced(
            &pins,
            &namespace_of,
            &mut may_read,
            &nodes,
            &Settings::default(),
            local,
            &mut self.scores,
        );
        if std::env::var("MYCEL_SIM_PLAN_DEBUG").is_ok_and(|d| d == i.to_string()) {
            for a in p.for_node(&me) {
                let root = match a {
                    plan::Action::Fetch { root, .. }
                    | plan::Action::Cancel { root, .. }
                    | plan::Action::Release { root, .. } => root,
                };
                let spec = pins.iter().find(|s| &s.root == root);
                let holders: Vec<String> = nodes
                    .iter()
                    .filter_map(|n| {
                        let j = self.by_peer.get(&PeerId::from_bytes(&n.node.id)?)?;
                        let h = n.holdings.get(root)?;
                        let ns = view
                            .pins
                            .get(root)
                            .map_or(access::DEFAULT_NAMESPACE.to_string(), |p| p.namespace.clone());
                        Some(format!(
                            "{j}{}{}{}{}@{}",
                            if matches!(h, Held::Complete) { "C" } else { "P" },
                            if n.alive { "" } else { "(dead)" },
                            if n.storage { "" } else { "(nostore)" },
                            if core_access::may_read_namespace(
                                view,
                                &PeerId::from_bytes(&n.node.id)?,
                                &ns
                            ) {
                                ""
                            } else {
                                "(noread)"
                            },
                            n.node.zone
                        ))
                    })
                    .collect();
                eprintln!(
                    "{} node {i}@{} {:?} min/max {:?} holders {holders:?}",
                    self.now,
                    self.nodes[i].zone,
                    match a {
                        plan::Action::Fetch { .. } => "fetch",
                        plan::Action::Cancel { .. } => "cancel",
                        plan::Action::Release { .. } => "release",
                    },
                    spec.map(|s| (
                        s.replicas_min,
                        s.replicas_max,
                        s.zones.clone(),
                        s.preposition.clone()
                    ))
                );
            }
        }
        let mut start = Vec::new();
        let mut cancel = Vec::new();
        let mut release = Vec::new();
        for a in p.for_node(&me) {
            match a {
                plan::Action::Fetch { root, .. } => {
                    let skip = cfg!(feature = "sim-bugs")
                        && self.bugs & crate::bugs::IGNORE_PREPOSITIONS != 0
                        && view.pins.get(root).is_some_and(|p| !p.preposition.is_empty());
                    if let Ok(c) = Cid::from_bytes(root)
                        && !skip
                    {
                        start.push(c);
                    }
                }
                plan::Action::Cancel { root, .. } => {
                    if let Ok(c) = Cid::from_bytes(root) {
                        cancel.push(c);
                    }
                }
                plan::Action::Release { root, .. } => {
                    if let Ok(c) = Cid::from_bytes(root) {
                        release.push(c);
                    }
                }
            }
        }
        self.nodes[i].last_plan = Some(digest);
        for c in cancel {
            if matches!(self.nodes[i].fetches.get(&c), Some((_, Purpose::Replica))) {
                self.nodes[i].fetches.remove(&c);
            }
        }
        for c in release {
            self.release(i, c);
        }
        for c in start {
            if !self.nodes[i].complete.contains(&c) && !self.nodes[i].fetches.contains_key(&c) {
                let f = Fetch::new(c, FetchConfig::default(), Timestamp(local));
                self.nodes[i].fetches.insert(c, (f, Purpose::Replica));
                self.record("fetch", i as u64, 0);
            }
        }
        self.refresh_peers(i);
    }

    /// Adds every holder the directory knows to the node's fetches.
    fn refresh_peers(&mut self, i: usize) {
        let roots: Vec<Cid> = self.nodes[i].fetches.keys().copied().collect();
        for r in roots {
            let holders = self.nodes[i].directory.holders(&r);
            let my_zone = self.nodes[i].zone.clone();
            let me = self.nodes[i].peer;
            let n = &mut self.nodes[i];
            if let Some((f, _)) = n.fetches.get_mut(&r) {
                for h in holders {
                    if h.peer != me && !n.banned.contains_key(&h.peer) {
                        f.add_peer(h.peer, h.zone.as_deref() == Some(my_zone.as_str()));
                    }
                }
            }
        }
    }

    // ---- workload ----

    fn publish(&mut self, k: u32, preposition: bool) {
        if self.healed_at.is_some() {
            return;
        }
        let w = self.sc.workload.clone();
        let origins: Vec<usize> = (self.sc.managers as usize..self.members)
            .filter(|&j| self.nodes[j].kind == Kind::Edge)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].hostility == Hostility::Honest)
            .collect();
        let Some(&origin) = origins.choose(&mut self.rng) else { return };
        let zone = self.nodes[origin].zone.clone();
        let restricted = !preposition && self.rng.gen_range(0..100) < w.restricted_pct;
        let kib = if preposition {
            w.preposition_kib
        } else {
            self.rng.gen_range(w.object_kib_min..=w.object_kib_max)
        };
        let obj = content::generate(
            self.seed ^ (u64::from(k) << 32) ^ u64::from(preposition),
            kib as usize * 1024,
        );
        for (cid, b) in &obj.blocks {
            self.store(origin, *cid, b);
        }
        self.nodes[origin].complete.insert(obj.root);
        let local = self.nodes[origin].local(self.now);
        self.nodes[origin].announcer.announce_soon(Timestamp(local));
        let namespace =
            if restricted { format!("ns-{zone}") } else { access::DEFAULT_NAMESPACE.into() };
        let pin = Pin {
            root: obj.root.to_bytes().to_vec(),
            name: format!("object-{k}"),
            namespace: namespace.clone(),
            replicas_min: w.replicas_min,
            replicas_max: w.replicas_max,
            zones: if restricted { vec![zone.clone()] } else { vec![] },
            tags: vec![],
            preposition: if preposition { vec![zone.clone()] } else { vec![] },
            deadline_ms: if preposition && w.preposition_deadline.0 > 0 {
                local + w.preposition_deadline.0
            } else {
                0
            },
        };
        if pin.deadline_ms > 0 {
            self.deadlines.push(grants::DeadlineRec {
                root: obj.root,
                at: self.nodes[origin].global(pin.deadline_ms),
                len: obj.len,
                targets: (0..self.members)
                    .filter(|&j| self.nodes[j].kind == Kind::Edge && self.nodes[j].zone == zone)
                    .count() as u64,
                done: false,
            });
        }
        self.pin_by_root.insert(obj.root, self.pins.len());
        self.pins.push(PinRec { root: obj.root, namespace, zone: restricted.then_some(zone) });
        self.nodes[origin].proposals.push_back((vec![Command::AddPin(pin)], vec![obj.root]));
        self.record("publish", origin as u64, u64::from(k));
        self.pump(origin);
        self.after(origin);
    }

    /// An edge tries to fetch content of another zone's namespace: it must be refused.
    fn curious(&mut self) {
        let restricted: Vec<PinRec> = self
            .pins
            .iter()
            .filter(|p| p.zone.is_some() && self.acked_pins.contains(&p.root))
            .cloned()
            .collect();
        let Some(p) = restricted.choose(&mut self.rng).cloned() else { return };
        let zone = p.zone.clone().unwrap_or_default();
        let cands: Vec<usize> = (self.sc.managers as usize..self.members)
            .filter(|&j| self.nodes[j].kind == Kind::Edge)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].zone != zone)
            .collect();
        let Some(&i) = cands.choose(&mut self.rng) else { return };
        self.probe_outside_tree(i, p.root);
        if self.nodes[i].complete.contains(&p.root) || self.nodes[i].fetches.contains_key(&p.root) {
            return;
        }
        let local = self.nodes[i].local(self.now);
        let mut f = Fetch::new(p.root, FetchConfig::default(), Timestamp(local));
        for j in 0..self.members {
            if self.nodes[j].complete.contains(&p.root) && j != i {
                f.add_peer(self.nodes[j].peer, false);
            }
        }
        self.nodes[i].fetches.insert(p.root, (f, Purpose::Curious(local)));
        self.record("curious", i as u64, 0);
        let _ = p.namespace;
        self.after(i);
    }

    /// Node `i` asks a holder of `secret` (a root it may not read) for that root's manifest
    /// under another root it may read: the serving side's tree check must refuse it.
    fn probe_outside_tree(&mut self, i: usize, secret: Cid) {
        let peer = self.nodes[i].peer;
        let found = (0..self.members).filter(|&s| s != i && self.nodes[s].live()).find_map(|s| {
            let n = &self.nodes[s];
            if !n.complete.contains(&secret) {
                return None;
            }
            n.complete
                .iter()
                .find(|r| {
                    **r != secret && core_access::check_read(n.view(), &peer, r, None).is_ok()
                })
                .map(|r| (s, *r))
        });
        let Some((s, cover)) = found else { return };
        let want = Frame::Want { req: 0, root: cover.to_bytes(), cids: vec![secret.to_bytes()] };
        self.record("probe-tree", i as u64, s as u64);
        self.send(i, s, Msg::Frame { root: cover, bytes: want.encode() });
    }

    /// A non-member asks members for pinned content.
    fn outsider(&mut self, i: usize) {
        if self.healed_at.is_none() {
            let at = self.now + 5_000;
            self.push(at, Ev::Outsider(i));
        }
        let roots: Vec<Cid> = self.acked_pins.iter().copied().collect();
        let Some(&root) = roots.choose(&mut self.rng) else { return };
        let to = self.rng.gen_range(0..self.members);
        let f = Frame::Want { req: 1, root: root.to_bytes(), cids: vec![root.to_bytes()] };
        self.send(i, to, Msg::Frame { root, bytes: f.encode() });
        self.record("outsider", i as u64, to as u64);
    }

    // ---- faults ----

    fn pick(&mut self, role: Option<Kind>, alive: bool) -> Option<usize> {
        let c: Vec<usize> = (0..self.members)
            .filter(|&j| {
                role.is_none_or(|r| {
                    self.nodes[j].kind == r || (r == Kind::Manager && self.nodes[j].core.is_some())
                })
            })
            .filter(|&j| self.nodes[j].live() == alive && !self.nodes[j].dead)
            .collect();
        c.choose(&mut self.rng).copied()
    }

    fn on_fault(&mut self, f: Fault) {
        if self.healed_at.is_some() && !matches!(f, Fault::Restart(_)) {
            return;
        }
        match f {
            Fault::Crash { restart_after, role, node } => {
                let Some(i) = node.or_else(|| self.pick(role, true)) else { return };
                if !self.nodes[i].live() {
                    return;
                }
                self.crash(i);
                match restart_after {
                    Some(after) => {
                        self.fault("crash", i as u64);
                        let at = self.now + after;
                        self.push(at, Ev::Fault(Fault::Restart(i)));
                    }
                    None => {
                        self.fault("kill", i as u64);
                        self.nodes[i].dead = true;
                    }
                }
            }
            Fault::Restart(i) => self.restart(i),
            Fault::Pause(node, len) => {
                let Some(i) = node.or_else(|| self.pick(None, true)) else { return };
                self.nodes[i].paused_until = self.now + len;
                self.fault("pause", i as u64);
            }
            Fault::Partition(p, len) => {
                let p = match p {
                    Some(Partition::Isolate(i)) => Partition::Isolate(i),
                    Some(p) => p,
                    None => self.random_partition(),
                };
                let kind = match &p {
                    Partition::Zones(_) => "partition-zones",
                    Partition::Isolate(_) => "partition-isolate",
                    Partition::OneWay(..) => "partition-one-way",
                };
                let id = self.next_partition;
                self.next_partition += 1;
                self.partitions.insert(id, p);
                self.fault(kind, id);
                let at = self.now + len;
                self.push(at, Ev::Fault(Fault::Unpartition(id)));
            }
            Fault::IsolateRole(role, len) => {
                if let Some(i) = self.pick(role, true) {
                    self.on_fault(Fault::Partition(Some(Partition::Isolate(i)), len));
                }
            }
            Fault::Unpartition(id) => {
                self.partitions.remove(&id);
                self.record("unpartition", id, 0);
            }
            Fault::BitFlip => self.bitflip(),
            Fault::FsyncFail => {
                let Some(i) = self.pick(Some(Kind::Manager), true) else { return };
                if self.nodes[i].core.is_none() {
                    return;
                }
                self.nodes[i].backend.fail_syncs(true);
                self.fault("fsync-fail", i as u64);
            }
            Fault::Loss(rate) => {
                self.loss = rate;
                self.fault("loss", (rate * 1e6) as u64);
            }
            Fault::HealAll => {
                self.partitions.clear();
                self.loss = 0.0;
                self.record("heal-network", 0, 0);
            }
        }
    }

    fn random_partition(&mut self) -> Partition {
        match self.rng.gen_range(0..3) {
            0 if self.zones.len() > 1 => {
                let z = self.rng.gen_range(0..self.zones.len());
                Partition::Zones(BTreeSet::from([z]))
            }
            1 => {
                let i = self.rng.gen_range(0..self.members);
                Partition::Isolate(i)
            }
            _ => {
                let a = self.rng.gen_range(0..self.members);
                let b = self.rng.gen_range(0..self.members);
                Partition::OneWay(a, b)
            }
        }
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.up {
            return;
        }
        n.backend.crash();
        n.core = None;
        n.up = false;
        n.fetches.clear();
        n.outstanding = None;
        n.proposals.clear();
        // Volatile: a restarted node's client starts over, above the sequences it used.
        n.client = Client::new(n.peer, ClientConfig::default(), n.client.last_seq());
        // The followed state is on disk (the daemon saves it); who was asked is not.
        let followed = n.follower.state().clone();
        n.follower = Follower::new(followed, FOLLOW);
        n.banned.clear();
        n.timer_at = u64::MAX;
        n.paused_until = 0;
        n.decider = None;
        n.reports.clear();
        // The fetches the last plan asked for are gone: the next plan must run.
        n.last_plan = None;
        // An apply record not yet synced is lost (the rename was not yet durable: the
        // previous file and record are back).
        if n.router.crash()
            && let Some(f) = self.topo.as_mut()
        {
            f.stats.records_lost += 1;
        }
        self.tear_unsynced(i);
        self.record("crash", i as u64, 0);
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].up || self.nodes[i].dead {
            return;
        }
        let local = self.nodes[i].local(self.now);
        let seed = self.seed ^ (i as u64) << 20 ^ self.nodes[i].restarts << 40;
        let n = &mut self.nodes[i];
        n.up = true;
        n.restarts += 1;
        n.backend.fail_syncs(false);
        n.announcer = Announcer::new(
            n.peer,
            &n.zone.clone(),
            self.sc.announce_period.0,
            Timestamp(local),
            seed,
        );
        // As the daemon does: sequence numbers start at the start time, so peers that
        // remember a higher number from before the crash do not ignore the new ones.
        n.announcer.start_seq_at(local);
        n.directory = Directory::new(3 * self.sc.announce_period.0);
        n.next_housekeeping = local;
        n.next_plan = local + 1_000;
        n.up_busy_us = self.now * 1000;
        self.recover_store(i);
        let n = &mut self.nodes[i];
        // Complete roots are found again by reading the store.
        let roots: Vec<Cid> = n.complete.iter().copied().collect();
        for r in roots {
            if content::object_blocks(&n.store, &r).is_none() {
                n.complete.remove(&r);
            }
        }
        let was_manager = self.nodes[i].kind == Kind::Manager
            || self.nodes[i]
                .view()
                .member_by_raft_id(self.nodes[i].raft_id)
                .is_some_and(|m| m.role == Role::Manager);
        if was_manager || self.nodes[i].backend.syncs() > 0 {
            self.start_core(i, Vec::new());
        }
        self.fault("restart", i as u64);
        self.after(i);
    }

    /// Flips a bit in one stored copy of a block that has another healthy copy elsewhere
    /// (the fault bound: one healthy copy of acknowledged data always exists).
    fn bitflip(&mut self) {
        if self.bitflips_left == 0 {
            return;
        }
        let cands: Vec<usize> = (0..self.members)
            .filter(|&j| !self.nodes[j].store.is_empty() && !self.nodes[j].dead)
            .collect();
        let Some(&i) = cands.choose(&mut self.rng) else { return };
        let k = self.rng.gen_range(0..self.nodes[i].store.len());
        let Some((&cid, b)) = self.nodes[i].store.iter().nth(k) else { return };
        let b = b.clone();
        // The other copy must be part of an object its node holds complete: a block left
        // over from a fetch that did not finish (a write error, a crash) is served to no
        // one who does not already know to ask.
        let healthy_elsewhere = (0..self.members).any(|j| {
            let n = &self.nodes[j];
            j != i
                && !n.dead
                && n.hostility == Hostility::Honest
                && n.store.get(&cid).is_some_and(|x| cid.matches(x))
                && n.complete
                    .iter()
                    .any(|r| content::object_cids(&n.store, r).is_some_and(|c| c.contains(&cid)))
        });
        // One damaged copy of an object at a time: nothing scrubs yet (the scrub-and-repair
        // issue), so latent damage on several copies, then a plan releasing the one healthy
        // copy (the others look complete), loses data no node could have seen coming.
        let damaged_elsewhere = (0..self.members).any(|j| {
            let n = &self.nodes[j];
            j != i
                && n.complete.iter().any(|r| {
                    content::object_cids(&n.store, r).is_some_and(|cids| {
                        cids.contains(&cid)
                            && cids.iter().any(|c| n.store.get(c).is_some_and(|x| !c.matches(x)))
                    })
                })
        });
        if !healthy_elsewhere || damaged_elsewhere {
            return;
        }
        let mut v = b.to_vec();
        let at = self.rng.gen_range(0..v.len().max(1));
        if let Some(x) = v.get_mut(at) {
            *x ^= 1 << self.rng.gen_range(0..8);
        }
        self.nodes[i].store.insert(cid, Rc::from(v));
        self.bitflips_left -= 1;
        self.fault("bitflip", i as u64);
    }

    // ---- heal and convergence ----

    fn heal(&mut self) {
        self.healed_at = Some(self.now);
        self.partitions.clear();
        self.loss = 0.0;
        self.record("heal", 0, 0);
        for i in 0..self.members {
            self.nodes[i].paused_until = 0;
            self.nodes[i].backend.fail_syncs(false);
            if !self.nodes[i].up && !self.nodes[i].dead {
                self.restart(i);
            }
        }
        let at = self.now + 500;
        self.push(at, Ev::Converge);
    }

    fn live_members(&self) -> Vec<usize> {
        (0..self.members).filter(|&j| self.nodes[j].live()).collect()
    }

    fn converge(&mut self) {
        let healed = self.healed_at.expect("after heal");
        let since = self.now - healed;
        if self.conv.leader_ms.is_none() {
            if self.agreed_leader().is_some() {
                self.conv.leader_ms = Some(since);
            } else if since > HEAL_LEADER_ELECTIONS * ELECTION_MS {
                let now = self.now;
                self.checker.fail(
                    now,
                    "liveness:leader",
                    format!("no leader {} election timeouts after the heal", HEAL_LEADER_ELECTIONS),
                );
                self.done = true;
                return;
            }
        }
        if let (Some(leader_ms), None) = (self.conv.leader_ms, self.conv.config_ms) {
            let leader = self.agreed_leader();
            let state = leader.and_then(|l| self.nodes[l].core.as_ref()).map(|c| c.state());
            // The cluster must exist: initialised, with every node a member (or removed).
            let formed = state.is_some_and(|s| {
                s.cluster_id.is_some()
                    && (0..self.members).all(|j| {
                        let p = self.nodes[j].peer.as_bytes();
                        s.members.contains_key(p) || s.removed.contains(p)
                    })
            });
            let target = state.filter(|_| formed).map(|s| (s.applied_index, s.removed.clone()));
            let all = target.as_ref().is_some_and(|(t, removed)| {
                self.live_members().iter().all(|&j| {
                    self.nodes[j].view().applied_index == *t
                        || removed.contains(self.nodes[j].peer.as_bytes())
                })
            });
            let target = target.map(|(t, _)| t);
            if all {
                self.conv.config_ms = Some(since);
            } else if since > leader_ms + HEAL_CONFIG_MS {
                let behind: Vec<usize> = self
                    .live_members()
                    .into_iter()
                    .filter(|&j| Some(self.nodes[j].view().applied_index) != target)
                    .take(8)
                    .collect();
                let now = self.now;
                self.checker.fail(
                    now,
                    "liveness:configuration",
                    format!("nodes {behind:?} not on the latest configuration (index {target:?}) 30 s after the leader"),
                );
                self.done = true;
                return;
            }
        }
        if self.conv.replicas_ms.is_none() {
            match self.replicas_short() {
                None => self.conv.replicas_ms = Some(since),
                Some(why) if since > HEAL_REPLICAS_MS => {
                    let now = self.now;
                    self.checker.fail(
                        now,
                        "liveness:replicas",
                        format!("5 simulated minutes after the heal: {why}"),
                    );
                    self.done = true;
                    return;
                }
                Some(_) => {}
            }
        }
        self.check_deadlines();
        if let (Some(config_ms), true, None) =
            (self.conv.config_ms, self.topo.is_some(), self.conv.topology_ms)
        {
            match self.topology_short() {
                None => self.conv.topology_ms = Some(since),
                Some(why) if since > config_ms + routers::HEAL_TOPOLOGY_MS => {
                    let now = self.now;
                    self.checker.fail(
                        now,
                        "liveness:topology",
                        format!(
                            "{} s after the configuration converged: {why}",
                            routers::HEAL_TOPOLOGY_MS / 1000
                        ),
                    );
                    self.done = true;
                    return;
                }
                Some(_) => {}
            }
        }
        if self.conv.leader_ms.is_some()
            && self.conv.config_ms.is_some()
            && self.conv.replicas_ms.is_some()
            && (self.topo.is_none() || self.conv.topology_ms.is_some())
        {
            self.done = true;
            return;
        }
        let at = self.now + 500;
        self.push(at, Ev::Converge);
    }

    /// A leader that every live voter follows.
    fn agreed_leader(&self) -> Option<usize> {
        let leader = (0..self.members)
            .filter(|&j| self.nodes[j].live())
            .filter(|&j| self.nodes[j].core.as_ref().is_some_and(|c| c.is_leader()))
            .max_by_key(|&j| self.nodes[j].core.as_ref().map(|c| c.term()))?;
        let c = self.nodes[leader].core.as_ref()?;
        let (voters, _) = c.conf();
        let id = c.id();
        let ok = voters.iter().all(|v| {
            let j = *v as usize - 1;
            j >= self.members
                || !self.nodes[j].live()
                || self.nodes[j].core.as_ref().is_some_and(|x| x.leader() == id)
        });
        ok.then_some(leader)
    }

    /// Why some acknowledged pin is below its minimum (or a pre-position incomplete), from
    /// what nodes really hold.
    fn replicas_short(&self) -> Option<String> {
        self.pins_short(None)
    }

    /// [`World::replicas_short`] for the pre-position of `root` alone.
    fn preposition_short(&self, root: &Cid) -> Option<String> {
        self.pins_short(Some(root))
    }

    fn pins_short(&self, only: Option<&Cid>) -> Option<String> {
        let Some(leader) = self.agreed_leader() else {
            return Some("no agreed leader".into());
        };
        let state = self.nodes[leader].core.as_ref()?.state();
        let pins: Vec<PinSpec> = state
            .pins
            .values()
            .filter(|p| Cid::from_bytes(&p.root).is_ok_and(|c| self.acked_pins.contains(&c)))
            .filter(|p| only.is_none_or(|o| o.to_bytes()[..] == p.root[..]))
            .map(|p| mycel_core::replicate::pin_spec(p, 0))
            .collect();
        let nodes: Vec<NodeState> = state
            .members
            .values()
            .map(|m| {
                let j = m.raft_id as usize - 1;
                let n = &self.nodes[j];
                NodeState {
                    node: Candidate {
                        id: m.peer.clone(),
                        zone: m.zone.clone(),
                        tags: m.tags.clone(),
                        free_bytes: CAPACITY_BYTES,
                        load: 0,
                        rtt_ms: None,
                    },
                    storage: m.role == Role::Edge,
                    alive: n.live(),
                    holdings: n
                        .complete
                        .iter()
                        .map(|c| (c.to_bytes().to_vec(), Held::Complete))
                        .collect(),
                }
            })
            .collect();
        let p = plan::plan(&pins, &nodes, &Settings::default(), 0);
        for (spec, r) in pins.iter().zip(&p.pins) {
            let eligible = nodes
                .iter()
                .filter(|n| {
                    n.alive
                        && n.storage
                        && (spec.zones.is_empty() || spec.zones.contains(&n.node.zone))
                        && spec.tags.iter().all(|t| n.node.tags.contains(t))
                })
                .count() as u32;
            let want = spec.replicas_min.min(eligible);
            let root = Cid::from_bytes(&spec.root).map(|c| c.to_string()).unwrap_or_default();
            if r.replicas < want {
                return Some(format!(
                    "pin {root} has {} of {want} replicas ({})",
                    r.replicas,
                    self.fetch_status(&spec.root)
                ));
            }
            if let Some((held, all, _)) = r.preposition
                && held < all
            {
                return Some(format!(
                    "pre-position {root} reached {held} of {all} targets ({})",
                    self.fetch_status(&spec.root)
                ));
            }
        }
        None
    }

    /// Who holds and who fetches `root`, for a liveness failure's message.
    fn fetch_status(&self, root: &[u8]) -> String {
        let Ok(root) = Cid::from_bytes(root) else { return String::new() };
        let mut parts = Vec::new();
        for (j, n) in self.nodes.iter().enumerate().take(self.members) {
            if n.complete.contains(&root) {
                parts.push(format!("{j}:holds{}", if n.live() { "" } else { "(down)" }));
            } else if let Some((f, p)) = n.fetches.get(&root) {
                let pr = f.progress();
                parts.push(format!(
                    "{j}:fetching {:?} {}/{} bytes from {} peers",
                    p,
                    pr.done_bytes,
                    pr.total_bytes,
                    f.peers().count()
                ));
            }
        }
        parts.join(", ")
    }

    fn final_checks(&mut self) {
        let now = self.now;
        if self.healed_at.is_none() {
            self.checker.fail(
                now,
                "liveness:run",
                "the run ended before the heal (event queue empty)".into(),
            );
        }
        // Acknowledged proposals are in the log and in the leader's state.
        let applied = self.checker.applied_proposals();
        let acked: Vec<(Vec<u8>, u64)> = self.checker.acked.iter().cloned().collect();
        for (from, seq) in &acked {
            if !applied.contains(&(from.clone(), *seq)) {
                self.checker.fail(
                    now,
                    "safety:acknowledged-lost",
                    format!(
                        "proposal ({:?}, {seq}) acknowledged but never applied",
                        PeerId::from_bytes(from)
                    ),
                );
            }
        }
        if let Some(l) = self.agreed_leader()
            && let Some(c) = &self.nodes[l].core
        {
            let st = c.state();
            let mut lost = Vec::new();
            for (from, seq) in &acked {
                if st.dedup.get(from).is_none_or(|(s, _)| s < seq) {
                    lost.push((from.clone(), *seq));
                }
            }
            for (from, seq) in lost {
                self.checker.fail(
                    now,
                    "safety:acknowledged-lost",
                    format!(
                        "proposal ({:?}, {seq}) acknowledged but missing from the leader's state",
                        PeerId::from_bytes(&from)
                    ),
                );
            }
        }
        // Equal applied indexes, equal states: managers' cores, and every member's followed
        // configuration (reached by log deltas) against them.
        let mut digests: BTreeMap<u64, ([u8; 32], usize)> = BTreeMap::new();
        let cores = (0..self.members).filter_map(|j| {
            let n = &self.nodes[j];
            n.core.as_ref().filter(|_| n.live()).map(|c| (j, c.state()))
        });
        let followed = (0..self.members)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].kind != Kind::Outsider)
            .map(|j| (j, self.nodes[j].follower.state()))
            .filter(|(_, s)| s.applied_index > 0);
        let states: Vec<(usize, &ClusterState)> = cores.chain(followed).collect();
        let mut disagree = Vec::new();
        for (j, s) in states {
            let d = s.digest();
            match digests.get(&s.applied_index) {
                Some((other, k)) if *other != d => disagree.push((*k, j, s.applied_index)),
                Some(_) => {}
                None => {
                    digests.insert(s.applied_index, (d, j));
                }
            }
        }
        for (k, j, idx) in disagree {
            self.checker.fail(
                now,
                "safety:state-agreement",
                format!("nodes {k} and {j} differ at applied index {idx}"),
            );
        }
        // Every acknowledged pin is recoverable from some node's disk.
        let pins: Vec<Cid> = self.acked_pins.iter().copied().collect();
        for root in pins {
            let ok = (0..self.members).any(|j| {
                !self.nodes[j].dead && content::object_blocks(&self.nodes[j].store, &root).is_some()
            }) || self.recoverable_from_union(&root);
            if !ok {
                self.checker.fail(
                    now,
                    "safety:pin-recoverable",
                    format!("acknowledged pin {root} cannot be rebuilt from any disk"),
                );
            }
        }
    }

    fn recoverable_from_union(&self, root: &Cid) -> bool {
        let mut union: BTreeMap<Cid, Rc<[u8]>> = BTreeMap::new();
        for n in self.nodes.iter().take(self.members).filter(|n| !n.dead) {
            for (c, b) in &n.store {
                if cid_ok(c, b) {
                    union.entry(*c).or_insert_with(|| b.clone());
                }
            }
        }
        content::object_blocks(&union, root).is_some()
    }

    fn report(&mut self) -> Report {
        let mut violations = self.checker.violations.clone();
        if self.checker.dropped > 0 {
            violations.push(crate::report::Violation {
                at_ms: self.now,
                check: "more".into(),
                detail: format!("{} more violations not listed", self.checker.dropped),
            });
        }
        Report {
            seed: self.seed,
            scenario: self.sc.name.clone(),
            scenario_hash: self.scenario_hash.clone(),
            nodes: self.nodes.len() as u32,
            simulated_ms: self.now,
            events: self.events,
            messages: self.messages,
            bytes: self.bytes,
            acknowledged: self.checker.acked.len() as u64,
            plans_run: self.plans.0,
            plans_skipped: self.plans.1,
            pins: self.acked_pins.len() as u64,
            mix: self.mix.clone(),
            faults: self.faults.clone(),
            convergence: self.conv.clone(),
            violations,
            topology: self.topo.as_ref().map(|t| t.stats.clone()),
            releases: self.releases,
            granted_reads: self.granted_reads,
            deadlines_met: self.deadline_counts.0,
            deadlines_not_required: self.deadline_counts.1,
            trace_hash: self.trace.finalize().to_hex().to_string(),
            commit: COMMIT.into(),
        }
    }
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
