use super::*;

fn bound(records: u64, bytes: u64) -> Bound {
    Bound { records, bytes }
}

fn bodies(o: &Outbox, r: &str) -> Vec<Vec<u8>> {
    o.peek(r, 1000)
        .unwrap()
        .into_iter()
        .map(|r| r.body)
        .collect()
}

#[test]
fn each_receiver_drains_its_records_in_order_and_acks_remove_them() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&dir.path().join("outbox.redb"), bound(100, 1 << 20)).unwrap();
    for i in 0..5u8 {
        o.push("alertmanager", &[i]).unwrap();
        o.push("webhook", &[100 + i]).unwrap();
    }
    assert_eq!(bodies(&o, "alertmanager"), [[0], [1], [2], [3], [4]]);
    assert_eq!(bodies(&o, "webhook"), [[100], [101], [102], [103], [104]]);
    let first = o.peek("alertmanager", 2).unwrap();
    o.ack("alertmanager", first[1].seq).unwrap();
    assert_eq!(bodies(&o, "alertmanager"), [[2], [3], [4]]);
    // Another receiver's records stay.
    assert_eq!(bodies(&o, "webhook").len(), 5);
    let s = o.stats().unwrap();
    assert_eq!((s.records, s.bytes, s.dropped), (8, 8 * 9, 0));
    assert!(s.oldest_age.is_some());
}

#[test]
fn records_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    {
        let o = Outbox::open(&path, bound(100, 1 << 20)).unwrap();
        o.push("am", b"one").unwrap();
        o.push("am", b"two").unwrap();
        let first = o.peek("am", 1).unwrap();
        o.ack("am", first[0].seq).unwrap();
    }
    let o = Outbox::open(&path, bound(100, 1 << 20)).unwrap();
    assert_eq!(bodies(&o, "am"), [b"two".to_vec()]);
    // Sequence numbers go on from where they were.
    let next = o.push("am", b"three").unwrap();
    assert_eq!(next, 2);
    assert_eq!(bodies(&o, "am"), [b"two".to_vec(), b"three".to_vec()]);
}

#[test]
fn past_the_bound_the_oldest_go_first_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let o = Outbox::open(&dir.path().join("o.redb"), bound(3, 1 << 20)).unwrap();
    for i in 0..5u8 {
        o.push(if i % 2 == 0 { "a" } else { "b" }, &[i]).unwrap();
    }
    // 0 (a) and 1 (b) went; 2, 3, 4 stay.
    assert_eq!(bodies(&o, "a"), [[2], [4]]);
    assert_eq!(bodies(&o, "b"), [[3]]);
    assert_eq!(o.stats().unwrap().dropped, 2);
    // By bytes too: three 10-byte bodies (18 bytes with headers each) in 40 bytes keep two.
    let o = Outbox::open(&dir.path().join("p.redb"), bound(100, 40)).unwrap();
    for i in 0..3u8 {
        o.push("a", &[i; 10]).unwrap();
    }
    assert_eq!(bodies(&o, "a"), [[1u8; 10], [2u8; 10]]);
    let s = o.stats().unwrap();
    assert_eq!((s.records, s.bytes, s.dropped), (2, 36, 1));
    // A record larger than the whole outbox is refused, not stored.
    assert!(matches!(
        o.push("a", &[0; 64]),
        Err(OutboxError::TooLarge(64, 40))
    ));
    assert!(matches!(o.push("", b"x"), Err(OutboxError::BadReceiver)));
}
