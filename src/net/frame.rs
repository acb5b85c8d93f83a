//! Length-prefixed frames on QUIC streams: `u32` little-endian length, then that many bytes.
//!
//! The reader hands out `Bytes` that slice quinn's receive chunks when a frame fits in one, and
//! copies once otherwise, into pool memory placed so that the frame's payload is 4096-aligned
//! (a 1 MiB extent then goes to the O_DIRECT disk as it is; the disk used to copy it again,
//! about a third of a Secondary's memmove under 1M writes). The writer coalesces small frames
//! into one buffer (a copy that costs less than a chunk per frame) and passes large payloads
//! through as their own `Bytes`.

use super::MAX_FRAME;
use crate::disk::{IoBuf, BUF_ALIGN};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

/// Frames up to this size are copied into a coalescing buffer; larger ones go out zero-copy.
const COALESCE_MAX: usize = 16 << 10;
/// Bytes gathered before one write call; bounds the latency a batch adds.
const BATCH_BYTES: usize = 1 << 20;
/// Frames from this size on are assembled in aligned pool memory (below it, a payload is not
/// worth the pool's 4 KiB minimum).
const ALIGNED_MIN: usize = 4096;

/// Why a stream stopped yielding frames.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The peer finished the stream at a frame boundary.
    Finished,
    /// The stream or connection failed; quinn's error text.
    Failed(String),
    /// The peer broke the framing: too large, or finished mid-frame.
    Protocol(String),
}

impl std::fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadEnd::Finished => f.write_str("the peer finished the stream"),
            ReadEnd::Failed(e) | ReadEnd::Protocol(e) => f.write_str(e),
        }
    }
}

pub(crate) struct FrameReader {
    stream: RecvStream,
    /// Received bytes not yet consumed: the tail of the last chunk.
    buf: Bytes,
    /// Where a frame's payload starts, from its first bytes (`Tuning::payload_offset`).
    payload_offset: fn(&[u8]) -> usize,
}

impl FrameReader {
    pub(crate) fn new(stream: RecvStream, payload_offset: fn(&[u8]) -> usize) -> Self {
        FrameReader {
            stream,
            buf: Bytes::new(),
            payload_offset,
        }
    }

    /// The next complete frame.
    pub(crate) async fn next(&mut self) -> Result<Bytes, ReadEnd> {
        let mut hdr = match self.take(4).await? {
            Some(h) => h,
            None => return Err(ReadEnd::Finished),
        };
        let len = hdr.get_u32_le() as usize;
        if len > MAX_FRAME {
            return Err(ReadEnd::Protocol(format!(
                "peer sent a frame of {len} bytes, over the {MAX_FRAME}-byte limit"
            )));
        }
        match self.take(len).await? {
            Some(b) => Ok(b),
            None => Err(ReadEnd::Protocol(format!(
                "stream finished inside a {len}-byte frame"
            ))),
        }
    }

    /// Exactly `n` bytes; `None` if the stream finished before the first of them.
    async fn take(&mut self, n: usize) -> Result<Option<Bytes>, ReadEnd> {
        if self.buf.len() >= n {
            return Ok(Some(self.buf.split_to(n)));
        }
        if self.buf.is_empty() {
            // Common case for big chunks: the frame lies within the next chunk; slice it.
            match self.chunk().await? {
                None => return Ok(None),
                Some(c) if c.len() >= n => {
                    self.buf = c;
                    return Ok(Some(self.buf.split_to(n)));
                }
                Some(c) => self.buf = c,
            }
        }
        if n >= ALIGNED_MIN {
            // Pool memory, placed so that the frame's payload starts 4096-aligned.
            let lead = (BUF_ALIGN - (self.payload_offset)(&self.buf) % BUF_ALIGN) % BUF_ALIGN;
            let mut out = IoBuf::uninit_contents(lead + n);
            self.fill(&mut out[lead..]).await?;
            return Ok(Some(out.into_bytes().slice(lead..)));
        }
        let mut out = BytesMut::zeroed(n);
        self.fill(&mut out).await?;
        Ok(Some(out.freeze()))
    }

    /// Fills `dst` with the next bytes: what is left of `self.buf`, then further chunks; keeps
    /// what follows in `self.buf`.
    async fn fill(&mut self, dst: &mut [u8]) -> Result<(), ReadEnd> {
        let n = dst.len();
        let mut have = 0;
        let mut next = std::mem::take(&mut self.buf);
        loop {
            let take = next.len().min(n - have);
            // Both ranges are in bounds by construction (`take` is at most what each has left).
            if let (Some(d), Some(src)) = (dst.get_mut(have..have + take), next.get(..take)) {
                d.copy_from_slice(src);
            }
            have += take;
            if have == n {
                self.buf = next.slice(take..);
                return Ok(());
            }
            next = match self.chunk().await? {
                Some(c) => c,
                None => {
                    return Err(ReadEnd::Protocol(format!(
                        "stream finished inside a frame ({have} of {n} bytes)"
                    )))
                }
            };
        }
    }

    async fn chunk(&mut self) -> Result<Option<Bytes>, ReadEnd> {
        match self.stream.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => Ok(Some(c.bytes)),
            Ok(None) => Ok(None),
            Err(e) => Err(ReadEnd::Failed(e.to_string())),
        }
    }
}

fn header(len: usize) -> [u8; 4] {
    // Callers check len <= MAX_FRAME, which fits in u32.
    (len as u32).to_le_bytes()
}

/// Writes one frame directly (used during connection setup, before the writer task runs).
pub(crate) async fn write_frame(stream: &mut SendStream, payload: &[u8]) -> Result<(), String> {
    let mut b = BytesMut::with_capacity(4 + payload.len());
    b.put_slice(&header(payload.len()));
    b.put_slice(payload);
    stream.write_all(&b).await.map_err(|e| e.to_string())
}

/// One frame to send, as a head and a payload that travel together (the payload is not
/// copied into the head: a big write extent goes out as the caller's buffer). Either may be
/// empty.
#[derive(Debug)]
pub(crate) struct OutFrame {
    pub head: Bytes,
    pub payload: Bytes,
}

impl OutFrame {
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }
}

/// Drains `rx` onto `stream` until the channel closes (then finishes the stream) or a write fails.
pub(crate) async fn writer_task(mut stream: SendStream, mut rx: mpsc::UnboundedReceiver<OutFrame>) {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(64);
    let mut small = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut pending = 0usize;
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            let len = frame.len();
            pending += 4 + len;
            small.reserve(4 + frame.head.len());
            small.put_slice(&header(len));
            small.put(frame.head);
            if frame.payload.len() <= COALESCE_MAX {
                small.put(frame.payload);
            } else {
                chunks.push(small.split().freeze());
                chunks.push(frame.payload);
            }
            if pending < BATCH_BYTES && chunks.len() < 62 {
                next = rx.try_recv().ok();
            }
        }
        if !small.is_empty() {
            chunks.push(small.split().freeze());
        }
        if let Err(e) = stream.write_all_chunks(&mut chunks).await {
            tracing::debug!("data stream write ended: {e}");
            return;
        }
        chunks.clear();
    }
    let _ = stream.finish();
}
