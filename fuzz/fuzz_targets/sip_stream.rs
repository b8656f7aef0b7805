//! `tollgate_sip::framing::StreamFramer` with arbitrary chunking (TCP).
//!
//! Input layout: bytes 0-1 = max_len (little endian, at least 16), byte 2 =
//! chunking seed, the rest = the byte stream. The stream is framed twice:
//! pushed all at once, and pushed in pseudo-random chunks (1..=64 bytes)
//! with `next_message` drained after every push.
//!
//! Oracles: no panic; every frame is at most max_len bytes and is a prefix
//! of what remained of the stream (modulo skipped CRLFs); the sequence of
//! frames does not depend on the chunking (equal when neither run errors, a
//! prefix of the other when one does); each frame can be given to the parser.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_sip::framing::StreamFramer;
use tollgate_sip::message::parse;

fn drain(f: &mut StreamFramer, out: &mut Vec<Bytes>, max_len: usize) -> bool {
    loop {
        match f.next_message() {
            Ok(Some(m)) => {
                assert!(
                    m.len() <= max_len,
                    "frame of {} bytes > max_len {max_len}",
                    m.len()
                );
                assert!(!m.is_empty(), "empty frame");
                let _ = parse(&m);
                out.push(m);
            }
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max_len = (u16::from_le_bytes([data[0], data[1]]) as usize).max(16);
    let mut seed = u32::from(data[2]) | 0x9e37_0000;
    let stream = &data[3..];

    let mut one = StreamFramer::new(max_len);
    one.push(stream);
    let mut whole = vec![];
    let ok_whole = drain(&mut one, &mut whole, max_len);

    let mut chunked = StreamFramer::new(max_len);
    let mut parts = vec![];
    let mut ok_chunked = true;
    let mut i = 0;
    while i < stream.len() && ok_chunked {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let n = (1 + (seed % 64) as usize).min(stream.len() - i);
        chunked.push(&stream[i..i + n]);
        i += n;
        ok_chunked = drain(&mut chunked, &mut parts, max_len);
    }

    // frames are contiguous pieces of the stream, in order
    let mut pos = 0;
    for f in &whole {
        while pos < stream.len() && (stream[pos] == b'\r' || stream[pos] == b'\n') {
            pos += 1;
        }
        assert_eq!(
            &stream[pos..pos + f.len()],
            &f[..],
            "frame is not the next bytes of the stream"
        );
        pos += f.len();
    }

    let n = whole.len().min(parts.len());
    assert_eq!(whole[..n], parts[..n], "framing depends on chunking");
    if ok_whole && ok_chunked {
        assert_eq!(
            whole.len(),
            parts.len(),
            "framing depends on chunking (count)"
        );
    }
});
