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
