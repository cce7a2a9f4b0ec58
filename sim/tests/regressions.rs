//! Named regressions for behaviour of the cores that the simulator found. A test here that is
//! ignored documents a core bug the simulator works around; it asserts the behaviour we want
//! and is to be un-ignored when the core is fixed.

use mycel_chunker::Cid;
use mycel_proto::fetch::{Action, Config, Fetch, Local};
use mycel_proto::{PeerId, Timestamp};
use mycel_sim::content;

fn drain(
    f: &mut Fetch,
    now: Timestamp,
    store: &std::collections::BTreeMap<Cid, Vec<u8>>,
) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(a) = f.poll_action(now) {
        if let Action::Lookup { cid, need_bytes } = &a {
            let local = match store.get(cid) {
                None => Local::Absent,
                Some(b) if *need_bytes => Local::Bytes(b.clone()),
                Some(_) => Local::Present,
            };
            f.handle_local(*cid, local);
            continue;
        }
        out.push(a);
    }
    out
}

#[test]
fn fetch_forgets_dont_have_of_a_complete_holder() {
    // The only holder answers one want with DontHave (a transient read error), then says it
    // holds the root completely. The fetch should ask it again; it asks who-has forever.
    let o = content::generate(3, 64 * 1024);
    let holder: std::collections::BTreeMap<Cid, Vec<u8>> =
        o.blocks.iter().map(|(c, b)| (*c, b.to_vec())).collect();
    let peer = PeerId::from_bytes(&[1; 38]).unwrap();
    let mut f = Fetch::new(o.root, Config::default(), Timestamp(0));
    f.add_peer(peer, true);
    let empty = std::collections::BTreeMap::new();
    let mut now = Timestamp(0);
    let mut refused: Option<Cid> = None;
    let mut asked_after = false;
    for _ in 0..200 {
        for a in drain(&mut f, now, &empty) {
            match a {
                Action::Request { cids, .. } => {
                    for c in cids {
                        if refused.is_none() && c.codec() == mycel_chunker::Codec::Raw {
                            refused = Some(c);
                            f.handle_dont_have(peer, c);
                        } else {
                            asked_after |= refused == Some(c);
                            f.handle_block(peer, c, holder[&c].clone(), now);
                        }
                    }
                }
                Action::WhoHas { .. } => {
                    // The holder answers: complete.
                    f.add_peer(peer, true);
                }
                Action::Complete { .. } => {
                    assert!(asked_after, "completed without the refused chunk");
                    return;
                }
                _ => {}
            }
        }
        now = now.plus_ms(1_000);
        f.handle_timeout(now);
    }
    assert!(refused.is_some(), "the scenario refused one chunk");
    assert!(asked_after, "the fetch never asked the complete holder again");
}

/// Applies `commands` as one proposal of `from` at `index`; panics unless it applied.
fn apply(
    s: &mut mycel_consensus::state::ClusterState,
    index: u64,
    from: &[u8],
    commands: Vec<mycel_consensus::command::Command>,
) {
    use mycel_consensus::command::Proposal;
    use mycel_consensus::state::Outcome;
    let data = Proposal { from: from.to_vec(), seq: index, commands }.encode();
    let (_, _, outcome) = s.apply(index, &data).expect("a proposal");
    assert_eq!(outcome, Outcome::Applied, "index {index}");
}

#[test]
fn canary_promotion_waits_until_every_live_router_is_seen_holding_the_canary_version() {
    // Two subscribed routers, one of them the canary. Version 2 is in its canary phase and
    // version 3 is staged after it. The canary's hook succeeded; the other router holds
    // version 2 too, but the leader has only its report, which (as the daemon's does) names
    // the latest staged version it holds, and no gossip: the decider waits. Once gossip
    // shows it holding version 2, the decider promotes. The simulator found a run stuck
    // this way when a restarted router's announcements were ignored as stale (its driver
    // now starts their sequence numbers at the restart time, as the daemon does).
    use ed25519_dalek::SigningKey;
    use mycel_consensus::Timestamp as T;
    use mycel_consensus::command::{Command, Grant, Member, Role, StageTopology};
    use mycel_consensus::state::ClusterState;
    use mycel_consensus::topology::{self as t, Decider, HookResult, Observation};

    let key = |n: u8| SigningKey::from_bytes(&[n; 32]);
    let peer = |n: u8| t::peer_of_key(&key(n).verifying_key().to_bytes());
    let (manager, canary, other) = (peer(1), peer(2), peer(3));
    let member = |p: &Vec<u8>, role: Role, zone: &str, tags: Vec<String>| {
        Command::AddMember(Member {
            peer: p.clone(),
            raft_id: 0,
            role,
            zone: zone.into(),
            tags,
            capacity_bytes: 1 << 30,
            addrs: vec![],
        })
    };
    let sub = vec![t::subscription_tag("fab")];
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        &manager,
        vec![
            Command::InitCluster { cluster_id: [1; 16] },
            member(&manager, Role::Manager, "a", vec![]),
            member(&canary, Role::Router, "a", sub.clone()),
            member(&other, Role::Router, "b", sub),
            Command::AddGrant(Grant {
                subject: "role:router".into(),
                permission: "publish".into(),
                namespace: t::namespace("fab").into(),
            }),
            Command::SetTopologyCanary {
                name: "fab".into(),
                subjects: vec!["zone:a".into()],
                fail_pct_max: 50,
            },
        ],
    );
    let stage = |version: u64| {
        let doc = content::topology_doc(1, version, 4);
        let mut st = StageTopology {
            name: "fab".into(),
            base: version - 1,
            canonical: doc.canonical,
            chunker: content::chunker_config().into(),
            root: doc.object.root.to_bytes().to_vec(),
            source: doc.source.0.to_bytes().to_vec(),
            proposer: canary.clone(),
            proposed_ms: version,
            signature: vec![],
            force: false,
        };
        t::sign(&mut st, &key(2).to_bytes());
        Command::StageTopology(Box::new(st))
    };
    apply(&mut s, 2, &canary, vec![stage(1)]);
    let activate =
        |version, canary| Command::ActivateTopology { name: "fab".into(), version, canary };
    apply(&mut s, 3, &manager, vec![activate(1, false)]);
    apply(&mut s, 4, &canary, vec![stage(2)]);
    apply(&mut s, 5, &manager, vec![activate(2, true)]);
    apply(&mut s, 6, &canary, vec![stage(3)]);
    let topo = &s.topologies["fab"];
    assert_eq!(topo.canary_phase.map(|p| (p.version, p.started_index)), Some((2, 5)));
    assert_eq!(topo.latest(), 3);

    let observe = |holders: &[&Vec<u8>]| Observation {
        live: [canary.clone(), other.clone()].into(),
        holders: holders.iter().map(|p| (*p).clone()).collect(),
        hooks: [(canary.clone(), HookResult { activation_index: 5, applied: true })].into(),
    };
    let mut d = Decider::new(3_000);
    d.handle_observation("fab", 2, observe(&[&canary]));
    assert!(d.poll(&s, T(10_000)).is_empty(), "promoted with a router not seen holding it");
    d.handle_observation("fab", 2, observe(&[&canary, &other]));
    let out = d.poll(&s, T(11_000));
    assert_eq!(
        out,
        vec![vec![Command::EndTopologyCanary { name: "fab".into(), version: 2, promote: true }]]
    );
}

#[test]
#[allow(clippy::disallowed_methods, reason = "a test measuring that a replica applies quickly")]
fn a_replica_applies_a_megabyte_topology_proposal_quickly() {
    // Every manager parses the canonical bytes of each staged topology version while it
    // applies the entry. A document of about a megabyte, mostly numbers on one line, took
    // over a minute to parse (the parser computed every number's line and column from the
    // start of the text); a replica now applies it in well under five seconds.
    use ed25519_dalek::SigningKey;
    use mycel_chunker::topology::{Format, canonical_json, object_root, parse};
    use mycel_consensus::command::{Command, Grant, Member, Role, StageTopology};
    use mycel_consensus::state::ClusterState;
    use mycel_consensus::topology as t;

    let key = SigningKey::from_bytes(&[9; 32]);
    let router = t::peer_of_key(&key.verifying_key().to_bytes());
    let manager = vec![7u8; 38];
    let mut s = ClusterState::default();
    apply(
        &mut s,
        1,
        &manager,
        vec![
            Command::InitCluster { cluster_id: [2; 16] },
            Command::AddMember(Member {
                peer: manager.clone(),
                raft_id: 0,
                role: Role::Manager,
                zone: "a".into(),
                tags: vec![],
                capacity_bytes: 1 << 30,
                addrs: vec![],
            }),
            Command::AddMember(Member {
                peer: router.clone(),
                raft_id: 0,
                role: Role::Router,
                zone: "a".into(),
                tags: vec![t::subscription_tag("big")],
                capacity_bytes: 1 << 30,
                addrs: vec![],
            }),
            Command::AddGrant(Grant {
                subject: "role:router".into(),
                permission: "publish".into(),
                namespace: t::namespace("big").into(),
            }),
        ],
    );
    let mut text = String::from("{\"costs\":[");
    for i in 0..145_000u32 {
        if i > 0 {
            text.push(',');
        }
        text += &(100_000 + i).to_string();
    }
    text += "]}";
    let canonical = canonical_json(&parse(text.as_bytes(), Format::Json).unwrap());
    assert!(
        canonical.len() > 1_000_000 && canonical.len() <= t::CANONICAL_BYTES_MAX,
        "{}",
        canonical.len()
    );
    let config = content::chunker_config();
    let mut stage = StageTopology {
        name: "big".into(),
        base: 0,
        root: object_root(&canonical, &config).unwrap().to_bytes().to_vec(),
        canonical,
        chunker: config.into(),
        source: Cid::raw(b"big").to_bytes().to_vec(),
        proposer: router.clone(),
        proposed_ms: 1,
        signature: vec![],
        force: false,
    };
    t::sign(&mut stage, &key.to_bytes());
    let started = std::time::Instant::now();
    apply(&mut s, 2, &router, vec![Command::StageTopology(Box::new(stage))]);
    let took = started.elapsed();
    assert_eq!(s.topologies["big"].latest(), 1);
    assert!(took.as_secs() < 5, "applying the stage took {took:?}");
}
