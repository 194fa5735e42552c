//! What travels on database and cache connections, decoded in userspace from the bounded
//! prefixes the kernel hands over (issue 4's collectors build on these). Every function here
//! takes untrusted bytes: none may panic, whatever they are.

pub mod mysql;
pub mod pg;
pub mod resp;
pub mod sql;

/// Text from the wire: invalid UTF-8 is replaced (U+FFFD); when the bytes were `cut` by the
/// end of a prefix, a character split by the cut is dropped rather than shown as U+FFFD.
fn text(bytes: &[u8], cut: bool) -> String {
    let bytes = if cut {
        without_split_char(bytes)
    } else {
        bytes
    };
    String::from_utf8_lossy(bytes).into_owned()
}

/// `bytes` less a trailing multi-byte UTF-8 sequence that is missing its last bytes.
fn without_split_char(bytes: &[u8]) -> &[u8] {
    let n = bytes.len();
    // A cut sequence has its lead byte at most 3 bytes before the end.
    for back in 1..=n.min(3) {
        let i = n - back;
        let c = bytes[i];
        if c & 0xc0 == 0x80 {
            continue; // a continuation byte: the lead is further back
        }
        let need = match c {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if back < need { &bytes[..i] } else { bytes };
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_by_the_cut_is_dropped() {
        let s = "é€😀".as_bytes();
        for i in 0..=s.len() {
            let t = text(&s[..i], true);
            assert!(!t.contains('\u{fffd}'), "{i}: {t:?}");
            assert!("é€😀".starts_with(&t));
        }
        // Not cut: an incomplete sequence is invalid, and shows as such.
        assert_eq!(text(&s[..1], false), "\u{fffd}");
        assert_eq!(text(b"\xff", true), "\u{fffd}");
        assert_eq!(text(b"", true), "");
    }
}
