//! Message framing on stream transports (RFC 3261 §18.3): a message ends after
//! its header section plus `Content-Length` bytes. CRLF keep-alives (RFC 5626
//! §3.5.1) between messages are skipped.

use crate::message::MAX_MESSAGE_LEN;
use bytes::{Buf, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    #[error("stream message larger than the limit")]
    TooLarge,
    #[error("stream message without a valid Content-Length")]
    ContentLength,
}

/// Reassembles messages from a byte stream.
#[derive(Debug)]
pub struct StreamFramer {
    buf: BytesMut,
    max_len: usize,
    /// Double CRLF keep-alive pings seen (the caller answers with one CRLF).
    pub pings: u64,
}

impl Default for StreamFramer {
    fn default() -> Self {
        Self::new(MAX_MESSAGE_LEN)
    }
}

impl StreamFramer {
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(4096),
            max_len,
            pings: 0,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer to read into directly (zero-copy path for the driver).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next complete message, if one is buffered. An error means the
    /// stream can no longer be framed and must be closed.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FramingError> {
        // Skip keep-alive CRLFs.
        let mut skip = 0;
        while skip < self.buf.len() && (self.buf[skip] == b'\r' || self.buf[skip] == b'\n') {
            skip += 1;
        }
        if skip > 0 {
            if skip >= 4 {
                self.pings += 1;
            }
            self.buf.advance(skip);
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let Some((head_end, body_start)) = head_end(&self.buf) else {
            if self.buf.len() > self.max_len {
                return Err(FramingError::TooLarge);
            }
            return Ok(None);
        };
        let len = content_length(&self.buf[..head_end])?;
        let total = body_start.checked_add(len).ok_or(FramingError::TooLarge)?;
        if total > self.max_len {
            return Err(FramingError::TooLarge);
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(total).freeze()))
    }
}

fn head_end(data: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == b'\n' {
            if data[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if data[i + 1] == b'\r' && data.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// Content-Length (or compact `l`) from a header section. On streams it is
/// mandatory (RFC 3261 §18.3).
fn content_length(head: &[u8]) -> Result<usize, FramingError> {
    let mut found = None;
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = trim(&line[..colon]);
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            let value = trim(&line[colon + 1..]);
            let text = std::str::from_utf8(value).map_err(|_| FramingError::ContentLength)?;
            let n: usize = text.parse().map_err(|_| FramingError::ContentLength)?;
            if found.is_some() {
                // Two lengths: no safe way to frame (request smuggling).
                return Err(FramingError::ContentLength);
            }
            found = Some(n);
        }
    }
    found.ok_or(FramingError::ContentLength)
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"OPTIONS sip:x@y SIP/2.0\r\nl: 5\r\n\r\nhello";

    #[test]
    fn frames_across_arbitrary_chunks() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"\r\n\r\n");
        stream.extend_from_slice(MSG);
        stream.extend_from_slice(MSG);
        for chunk in 1..stream.len() {
            let mut f = StreamFramer::default();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                f.push(c);
                while let Some(m) = f.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 2, "chunk {chunk}");
            assert_eq!(&got[0][..], MSG);
        }
    }

    #[test]
    fn refuses_unframeable_streams() {
        let mut f = StreamFramer::new(100);
        f.push(b"OPTIONS sip:x@y SIP/2.0\r\nCall-ID: 1\r\n\r\n");
        assert_eq!(f.next_message(), Err(FramingError::ContentLength));
        let mut f = StreamFramer::new(100);
        f.push(b"OPTIONS sip:x@y SIP/2.0\r\nContent-Length: 1000\r\n\r\n");
        assert_eq!(f.next_message(), Err(FramingError::TooLarge));
        let mut f = StreamFramer::new(100);
        f.push(&[b'A'; 200]);
        assert_eq!(f.next_message(), Err(FramingError::TooLarge));
    }
}
