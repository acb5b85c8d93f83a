//! Length-prefixed frames on QUIC streams: `u32` little-endian length, then that many bytes.
//!
//! The reader hands out `Bytes` that slice quinn's receive chunks when a frame fits in one, and
//! copies once otherwise, into pool memory placed so that the frame's payload is 4096-aligned
//! (a 1 MiB extent then goes to the O_DIRECT disk as it is; the disk used to copy it again,
//! about a third of a Secondary's memmove under 1M writes). The writer coalesces small frames
//! into one buffer (a copy that costs less than a chunk per frame) and passes large payloads
//! through as their own `Bytes`.
//!
//! The reader takes its chunks from a [`ChunkSource`]: a QUIC stream in production, chunks given
//! up front ([`Chunks`]) in the unit tests and the `wire` fuzz target, so both drive the very
//! reassembly code the transport runs.

use super::MAX_FRAME;
use crate::disk::{IoBuf, BUF_ALIGN};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use quinn::{RecvStream, SendStream};
use std::collections::VecDeque;
use std::future::Future;

/// Payloads up to this size are copied into the coalescing buffer with their heads (acks and
/// other small messages: one chunk for many); a bigger one, a write extent from 4 KiB on, goes
/// to quinn as its own chunk, uncopied, and quinn copies it once, into the packet. (This was
/// 16 KiB, so every 4 KiB extent was copied twice; the copy here was 0.6 % of the Primary's CPU
/// at 4 KiB queue depth 32.)
const COALESCE_MAX: usize = 1024;
/// Frames from this size on are assembled in aligned pool memory (below it, a payload is not
/// worth the pool's 4 KiB minimum).
const ALIGNED_MIN: usize = 4096;

/// Why a stream stopped yielding frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEnd {
    /// The peer finished the stream at a frame boundary.
    Finished,
    /// The stream or connection failed; quinn's error text.
    Failed(String),
    /// The peer broke the framing.
    Protocol(Framing),
}

/// How the peer broke the stream's framing (the connection is closed with this text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A frame header announced more than [`MAX_FRAME`] bytes.
    TooLarge { len: usize },
    /// The stream finished after `have` of the `len` bytes of a frame (its header or its
    /// body; `have` 0: right after the header).
    FinishedInside { have: usize, len: usize },
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Framing::TooLarge { len } => write!(
                f,
                "peer sent a frame of {len} bytes, over the {MAX_FRAME}-byte limit"
            ),
            Framing::FinishedInside { have: 0, len } => {
                write!(f, "stream finished inside a {len}-byte frame")
            }
            Framing::FinishedInside { have, len } => {
                write!(f, "stream finished inside a frame ({have} of {len} bytes)")
            }
        }
    }
}

impl std::fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadEnd::Finished => f.write_str("the peer finished the stream"),
            ReadEnd::Failed(e) => f.write_str(e),
            ReadEnd::Protocol(e) => e.fmt(f),
        }
    }
}

/// Where a [`FrameReader`] gets its bytes.
pub trait ChunkSource {
    /// The next chunk of the stream; `None` once the peer finished it.
    fn chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, ReadEnd>> + Send;
}

impl ChunkSource for RecvStream {
    async fn chunk(&mut self) -> Result<Option<Bytes>, ReadEnd> {
        match self.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => Ok(Some(c.bytes)),
            Ok(None) => Ok(None),
            Err(e) => Err(ReadEnd::Failed(e.to_string())),
        }
    }
}

/// A stream's chunks given up front, then its end: never waits.
#[derive(Debug, Default)]
pub struct Chunks(VecDeque<Bytes>);

impl FromIterator<Bytes> for Chunks {
    fn from_iter<I: IntoIterator<Item = Bytes>>(iter: I) -> Self {
        Chunks(iter.into_iter().collect())
    }
}

impl ChunkSource for Chunks {
    fn chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, ReadEnd>> + Send {
        std::future::ready(Ok(self.0.pop_front()))
    }
}

/// Reassembles length-prefixed frames from a stream's chunks.
pub struct FrameReader<S = RecvStream> {
    stream: S,
    /// Received bytes not yet consumed: the tail of the last chunk.
    buf: Bytes,
    /// Where a frame's payload starts, from its first bytes (`Tuning::payload_offset`).
    payload_offset: fn(&[u8]) -> usize,
}

impl FrameReader<Chunks> {
    /// The next complete frame, without a runtime ([`Chunks`] never waits).
    pub fn next_now(&mut self) -> Result<Bytes, ReadEnd> {
        self.next().now_or_never().unwrap_or_else(|| {
            Err(ReadEnd::Failed(
                "an in-memory chunk source waited for more".into(),
            ))
        })
    }
}

impl<S: ChunkSource> FrameReader<S> {
    pub fn new(stream: S, payload_offset: fn(&[u8]) -> usize) -> Self {
        FrameReader {
            stream,
            buf: Bytes::new(),
            payload_offset,
        }
    }

    /// The next complete frame.
    pub async fn next(&mut self) -> Result<Bytes, ReadEnd> {
        let mut hdr = match self.take(4).await? {
            Some(h) => h,
            None => return Err(ReadEnd::Finished),
        };
        let len = hdr.get_u32_le() as usize;
        if len > MAX_FRAME {
            return Err(ReadEnd::Protocol(Framing::TooLarge { len }));
        }
        match self.take(len).await? {
            Some(b) => Ok(b),
            None => Err(ReadEnd::Protocol(Framing::FinishedInside { have: 0, len })),
        }
    }

    /// Exactly `n` bytes; `None` if the stream finished before the first of them.
    async fn take(&mut self, n: usize) -> Result<Option<Bytes>, ReadEnd> {
        if self.buf.len() >= n {
            return Ok(Some(self.buf.split_to(n)));
        }
        while self.buf.is_empty() {
            // Common case for big chunks: the frame lies within the next chunk; slice it. An
            // empty chunk is skipped: only a byte of the frame means that the stream cannot end
            // cleanly any more (a finish after an empty chunk used to be "finished inside a
            // frame", found by `frames_survive_any_cut`).
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
                None => return Err(ReadEnd::Protocol(Framing::FinishedInside { have, len: n })),
            };
        }
    }

    async fn chunk(&mut self) -> Result<Option<Bytes>, ReadEnd> {
        self.stream.chunk().await
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

    /// The frame as stream chunks: its length header and head, with a small payload copied in
    /// (one chunk), then a large payload as it is.
    fn chunks(self) -> ([Bytes; 2], usize) {
        let copy = self.payload.len() <= COALESCE_MAX;
        let mut b = BytesMut::with_capacity(
            4 + self.head.len() + if copy { self.payload.len() } else { 0 },
        );
        b.put_slice(&header(self.len()));
        b.put(self.head);
        if copy {
            b.put(self.payload);
            ([b.freeze(), Bytes::new()], 1)
        } else {
            ([b.freeze(), self.payload], 2)
        }
    }
}

/// The frames queued on one send stream, written by whoever sends while nothing waits (the
/// node's event loop, straight into quinn: no task wake per frame), and by the stream's writer
/// task ([`writer_task`]) once QUIC flow control has made frames wait, until they are out. One
/// mutex keeps the order: a sender writes itself only behind an empty queue.
pub(crate) struct Outbox {
    state: std::sync::Mutex<OutState>,
}

struct OutState {
    stream: SendStream,
    /// Chunks quinn has not taken yet, in stream order.
    queue: VecDeque<Bytes>,
    /// Every sender is gone: finish the stream once the queue is written.
    closed: bool,
    /// A write failed (the stream or the connection is gone): nothing more goes out.
    failed: bool,
    /// The writer task, parked while the queue is empty.
    writer: Option<std::task::Waker>,
}

/// Why a frame was not queued.
#[derive(Debug)]
pub(crate) struct OutboxFailed;

impl Outbox {
    pub(crate) fn new(stream: SendStream) -> std::sync::Arc<Outbox> {
        std::sync::Arc::new(Outbox {
            state: std::sync::Mutex::new(OutState {
                stream,
                queue: VecDeque::new(),
                closed: false,
                failed: false,
                writer: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        // Every update below is complete between statements; a panic elsewhere leaves a usable
        // state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame`, writing it into quinn at once if nothing waits before it. Never waits.
    pub(crate) fn send(&self, frame: OutFrame) -> Result<(), OutboxFailed> {
        let (chunks, n) = frame.chunks();
        let mut st = self.lock();
        let st = &mut *st;
        if st.failed {
            return Err(OutboxFailed);
        }
        let behind = !st.queue.is_empty();
        st.queue.extend(chunks.into_iter().take(n));
        if !behind {
            // Written now or not at all: a blocked stream leaves the rest to the writer task,
            // which registers its own waker with quinn when it polls.
            let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
            match st.write_queued(&mut cx) {
                std::task::Poll::Ready(true) => return Ok(()),
                std::task::Poll::Ready(false) => return Err(OutboxFailed),
                std::task::Poll::Pending => {}
            }
        }
        if let Some(w) = st.writer.take() {
            w.wake();
        }
        Ok(())
    }

    /// The senders are gone: the writer finishes the stream once the queue is out.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        if let Some(w) = st.writer.take() {
            w.wake();
        }
    }

    /// Writes the queue into quinn as far as flow control lets it; ready once the stream is
    /// finished (after `close`) or failed.
    fn poll_drain(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::task::Poll;
        let mut st = self.lock();
        if st.failed {
            return Poll::Ready(());
        }
        match st.write_queued(cx) {
            // quinn wakes us when the stream can take more.
            Poll::Pending => Poll::Pending,
            Poll::Ready(false) => Poll::Ready(()),
            Poll::Ready(true) if st.closed => {
                let _ = st.stream.finish();
                Poll::Ready(())
            }
            Poll::Ready(true) => {
                st.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl OutState {
    /// Writes the queue into quinn until it is empty (`true`), a write fails (`false`: the
    /// stream is marked failed and the queue dropped), or flow control blocks it (quinn then
    /// wakes `cx`).
    fn write_queued(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<bool> {
        use std::task::Poll;
        while !self.queue.is_empty() {
            let written = {
                let write = self.stream.write_chunks(self.queue.make_contiguous());
                std::pin::pin!(write).poll(cx)
            };
            match written {
                Poll::Ready(Ok(w)) => {
                    self.queue.drain(..w.chunks.min(self.queue.len()));
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!("data stream write ended: {e}");
                    self.failed = true;
                    self.queue.clear();
                    return Poll::Ready(false);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(true)
    }
}

/// Writes what waits in `out` whenever there is some, until the stream is finished or fails.
pub(crate) async fn writer_task(out: std::sync::Arc<Outbox>) {
    std::future::poll_fn(|cx| out.poll_drain(cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream_of(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut s = Vec::new();
        for f in frames {
            s.extend_from_slice(&header(f.len()));
            s.extend_from_slice(f);
        }
        s
    }

    /// `stream` cut before each offset in `cuts` (sorted, deduplicated, empty chunks allowed).
    fn cut(stream: &[u8], cuts: &[usize]) -> Chunks {
        let mut at = 0;
        let mut out = Vec::new();
        for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
            let c = c.min(stream.len()).max(at);
            out.push(Bytes::copy_from_slice(&stream[at..c]));
            at = c;
        }
        out.into_iter().collect()
    }

    fn read_all(chunks: Chunks, payload_offset: fn(&[u8]) -> usize) -> (Vec<Bytes>, ReadEnd) {
        let mut r = FrameReader::new(chunks, payload_offset);
        let mut got = Vec::new();
        loop {
            match r.next_now() {
                Ok(f) => got.push(f),
                Err(e) => return (got, e),
            }
        }
    }

    #[test]
    fn a_frame_spanning_chunks_is_assembled_with_its_payload_aligned() {
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let stream = stream_of(&[b"ab".to_vec(), big.clone()]);
        let cuts: Vec<usize> = (1..stream.len()).step_by(1000).collect();
        let (got, end) = read_all(cut(&stream, &cuts), |_| 40);
        assert_eq!(end, ReadEnd::Finished);
        assert_eq!(got.len(), 2);
        assert_eq!(&got[1][..], &big[..]);
        assert_eq!((got[1].as_ptr() as usize + 40) % BUF_ALIGN, 0);
    }

    #[test]
    fn empty_chunks_before_the_end_are_a_clean_finish() {
        let stream = stream_of(&[b"ab".to_vec()]);
        let chunks = [&stream[..], &[], &[]].map(Bytes::copy_from_slice);
        let (got, end) = read_all(chunks.into_iter().collect(), |_| 0);
        assert_eq!(got, [Bytes::from_static(b"ab")]);
        assert_eq!(end, ReadEnd::Finished);
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_a_protocol_error() {
        for frame in [vec![7; 10], vec![7; 100_000]] {
            let stream = stream_of(&[frame]);
            for end in [2, 4, 9, 5000] {
                let end = end.min(stream.len() - 1);
                let (got, e) = read_all(cut(&stream[..end], &[1, 3]), |_| 0);
                assert!(got.is_empty());
                assert!(
                    matches!(e, ReadEnd::Protocol(Framing::FinishedInside { .. })),
                    "{e:?}"
                );
            }
        }
        let (_, e) = read_all(cut(&header(MAX_FRAME + 1), &[]), |_| 0);
        assert!(
            matches!(e, ReadEnd::Protocol(Framing::TooLarge { len }) if len == MAX_FRAME + 1),
            "{e:?}"
        );
    }

    proptest! {
        /// Wherever the stream is cut, the reader yields the frames that were written and then
        /// ends at the boundary.
        #[test]
        fn frames_survive_any_cut(
            frames in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    proptest::collection::vec(any::<u8>(), 4000..9000),
                ],
                0..6,
            ),
            mut cuts in proptest::collection::vec(0usize..60_000, 0..40),
        ) {
            let stream = stream_of(&frames);
            cuts.sort_unstable();
            let (got, end) = read_all(cut(&stream, &cuts), crate::wire::payload_offset);
            prop_assert_eq!(end, ReadEnd::Finished);
            let got: Vec<Vec<u8>> = got.iter().map(|b| b.to_vec()).collect();
            prop_assert_eq!(got, frames);
        }
    }
}
