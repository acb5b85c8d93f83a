//! The NBD codec, sans I/O: a server-side handshake state machine, a request decoder and reply
//! encoders. Bytes in, bytes (or decoded values) out; nothing here blocks, allocates from a
//! client-given length, or panics on client input.

use super::proto::*;

/// What the server exports, as the handshake presents it.
#[derive(Debug, Clone)]
pub struct Export {
    /// The export's name; "" always selects it too.
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Minimum block size (the disk's logical block size: 512 or 4096).
    pub min_block: u32,
}

/// The outcome of a finished handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub structured: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStatus {
    /// Feed more bytes.
    NeedMore,
    /// Transmission phase starts with the next byte after `consumed`.
    Done(Negotiated),
    /// The client aborted; send the output, then close.
    Close,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client sent bad option magic {0:#018x} (not an NBD newstyle client?)")]
    BadOptionMagic(u64),
    #[error("client option {option} has absurd length {len} (limit {MAX_OPTION_LEN})")]
    OptionTooLong { option: u32, len: u32 },
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("handshake already finished")]
    Finished,
    /// The export may not be opened now (NBD_OPT_EXPORT_NAME cannot carry an error: the
    /// connection closes).
    #[error("refused: {0}")]
    Refused(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HsState {
    ClientFlags,
    Options,
    Finished,
}

/// Server side of the fixed-newstyle handshake.
#[derive(Debug)]
pub struct Handshake {
    export: Export,
    state: HsState,
    structured: bool,
    no_zeroes: bool,
    /// Set by [`Handshake::refuse`]: why the export may not be opened.
    refusal: Option<String>,
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Option reply data is bounded by what we generate (names ≤ 4096 bytes).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

impl Handshake {
    /// Start a handshake; the server greeting is appended to `out`.
    pub fn new(export: Export, out: &mut Vec<u8>) -> Handshake {
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            export,
            state: HsState::ClientFlags,
            structured: false,
            no_zeroes: false,
            refusal: None,
        }
    }

    /// Refuse to open the export (NBD_OPT_GO/INFO are answered NBD_REP_ERR_POLICY with `why`
    /// as the message clients print; NBD_OPT_EXPORT_NAME fails the handshake). Listing still
    /// works.
    pub fn refuse(&mut self, why: String) {
        self.refusal = Some(why);
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Transmission flags for the current negotiation state.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
        if self.structured {
            f |= FLAG_SEND_DF;
        }
        if self.export.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        f
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            structured: self.structured,
            flags: self.transmission_flags(),
        }
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    /// Consume as many complete client messages from `input` as possible, appending replies to
    /// `out`. Returns the number of bytes consumed and the status. After `Done` or `Close`, the
    /// bytes past `consumed` are not handshake bytes.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, HandshakeStatus), HandshakeError> {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or(&[]);
            match self.state {
                HsState::Finished => return Err(HandshakeError::Finished),
                HsState::ClientFlags => {
                    let Some(flags) = be_u32(rest, 0) else {
                        return Ok((pos, HandshakeStatus::NeedMore));
                    };
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(HandshakeError::BadClientFlags(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = HsState::Options;
                    pos += 4;
                }
                HsState::Options => {
                    let (Some(magic), Some(option), Some(len)) =
                        (be_u64(rest, 0), be_u32(rest, 8), be_u32(rest, 12))
                    else {
                        // Check the magic early so garbage is rejected without waiting.
                        if rest.len() >= 8 {
                            if let Some(m) = be_u64(rest, 0) {
                                if m != IHAVEOPT {
                                    return Err(HandshakeError::BadOptionMagic(m));
                                }
                            }
                        }
                        return Ok((pos, HandshakeStatus::NeedMore));
                    };
                    if magic != IHAVEOPT {
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    if len > MAX_OPTION_LEN {
                        return Err(HandshakeError::OptionTooLong { option, len });
                    }
                    let Some(data) = rest.get(16..16 + len as usize) else {
                        return Ok((pos, HandshakeStatus::NeedMore));
                    };
                    pos += 16 + len as usize;
                    if let Some(status) = self.option(option, data, out)? {
                        if status != HandshakeStatus::NeedMore {
                            self.state = HsState::Finished;
                        }
                        return Ok((pos, status));
                    }
                }
            }
        }
    }

    /// Handle one option. `Some(status)` ends the handshake.
    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<HandshakeStatus>, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => {
                if !self.name_matches(data) {
                    return Err(HandshakeError::UnknownExport(
                        String::from_utf8_lossy(data.get(..MAX_STRING_LEN).unwrap_or(data))
                            .into_owned(),
                    ));
                }
                if let Some(why) = &self.refusal {
                    return Err(HandshakeError::Refused(why.clone()));
                }
                out.extend_from_slice(&self.export.size.to_be_bytes());
                out.extend_from_slice(&self.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(Some(HandshakeStatus::Done(self.negotiated())))
            }
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Ok(Some(HandshakeStatus::Close))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(out, option, REP_ERR_INVALID, &[]);
                } else {
                    let name = self.export.name.as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name);
                    option_reply(out, option, REP_SERVER, &d);
                    option_reply(out, option, REP_ACK, &[]);
                }
                Ok(None)
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(out, option, REP_ERR_INVALID, &[]);
                } else {
                    self.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => Ok(self.info_or_go(option, data, out)),
            _ => {
                option_reply(out, option, REP_ERR_UNSUP, &[]);
                Ok(None)
            }
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<HandshakeStatus> {
        let Some(req) = parse_info_request(data) else {
            option_reply(out, option, REP_ERR_INVALID, &[]);
            return None;
        };
        if !self.name_matches(req.name) {
            option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            return None;
        }
        if let Some(why) = &self.refusal {
            // The message is bounded by what the server generates.
            option_reply(out, option, REP_ERR_POLICY, why.as_bytes());
            return None;
        }
        let mut d = Vec::with_capacity(64);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&self.export.size.to_be_bytes());
        d.extend_from_slice(&self.transmission_flags().to_be_bytes());
        option_reply(out, option, REP_INFO, &d);

        // Block sizes are sent unasked: the disk handles unaligned requests, so a client that
        // did not ask still works, and one that did gets the efficient sizes.
        d.clear();
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&self.export.min_block.to_be_bytes());
        d.extend_from_slice(&PREFERRED_BLOCK.max(self.export.min_block).to_be_bytes());
        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        option_reply(out, option, REP_INFO, &d);

        if req.wants(INFO_NAME) {
            d.clear();
            d.extend_from_slice(&INFO_NAME.to_be_bytes());
            d.extend_from_slice(self.export.name.as_bytes());
            option_reply(out, option, REP_INFO, &d);
        }
        if req.wants(INFO_DESCRIPTION) && !self.export.description.is_empty() {
            d.clear();
            d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            d.extend_from_slice(self.export.description.as_bytes());
            option_reply(out, option, REP_INFO, &d);
        }
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Some(HandshakeStatus::Done(self.negotiated()))
        } else {
            None
        }
    }
}

struct InfoRequest<'a> {
    name: &'a [u8],
    infos: &'a [u8],
}

impl InfoRequest<'_> {
    fn wants(&self, info: u16) -> bool {
        self.infos
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == info)
    }
}

/// NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count × u16 info types.
fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = be_u32(data, 0)? as usize;
    if name_len > MAX_STRING_LEN {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let count = be_u16(data, 4 + name_len)? as usize;
    let infos = data.get(6 + name_len..)?;
    if infos.len() != count * 2 {
        return None;
    }
    Some(InfoRequest { name, infos })
}

// ---------------------------------------------------------------------------------------------
// Transmission phase.

/// A request header exactly as received (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// Errors after which the connection cannot continue (the stream is out of sync or hostile).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FatalError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("request length {len} exceeds the maximum {MAX_PAYLOAD} (command {kind})")]
    TooLong { kind: u16, len: u32 },
}

/// Parse one request header from the first 28 bytes of `buf`. `Ok(None)`: need more bytes.
pub fn parse_header(buf: &[u8]) -> Result<Option<RequestHeader>, FatalError> {
    let (Some(magic), Some(flags), Some(kind), Some(cookie), Some(offset), Some(len)) = (
        be_u32(buf, 0),
        be_u16(buf, 4),
        be_u16(buf, 6),
        be_u64(buf, 8),
        be_u64(buf, 16),
        be_u32(buf, 24),
    ) else {
        if let Some(m) = be_u32(buf, 0) {
            if m != REQUEST_MAGIC {
                return Err(FatalError::BadMagic(m));
            }
        }
        return Ok(None);
    };
    if magic != REQUEST_MAGIC {
        return Err(FatalError::BadMagic(magic));
    }
    if (kind == CMD_READ || kind == CMD_WRITE) && len > MAX_PAYLOAD {
        return Err(FatalError::TooLong { kind, len });
    }
    Ok(Some(RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        len,
    }))
}

/// One whole request as [`decode_request`] finds it in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub header: RequestHeader,
    /// The WRITE payload (empty for other commands).
    pub payload: &'a [u8],
    /// Bytes of the buffer this request used.
    pub consumed: usize,
}

/// Decode one whole request (header and payload) from `buf`; `Ok(None)` means more bytes are
/// needed. The server itself uses [`parse_header`] so WRITE payloads can land directly in a
/// disk buffer.
pub fn decode_request(buf: &[u8]) -> Result<Option<Decoded<'_>>, FatalError> {
    let Some(header) = parse_header(buf)? else {
        return Ok(None);
    };
    let end = REQUEST_HEADER_LEN + header.payload_len() as usize;
    Ok(buf.get(REQUEST_HEADER_LEN..end).map(|payload| Decoded {
        header,
        payload,
        consumed: end,
    }))
}

/// Encode a request (client side: tests, benches, tools).
pub fn encode_request(out: &mut Vec<u8>, h: &RequestHeader) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&h.kind.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    out.extend_from_slice(&h.offset.to_be_bytes());
    out.extend_from_slice(&h.len.to_be_bytes());
}

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        /// NBD_CMD_FLAG_NO_HOLE: the zeroes must be allocated.
        no_hole: bool,
        /// NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly.
        fast: bool,
    },
    Disconnect,
}

/// What a connection's commands are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Transmission {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
}

/// Check a header against the export. `Err(errno)`: reply with that error (and, for a WRITE,
/// still consume its payload); the connection stays usable.
pub fn validate(h: &RequestHeader, t: &Transmission) -> Result<Command, u32> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let allowed = match h.kind {
        CMD_READ if t.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_DISC => u16::MAX,
        _ => CMD_FLAG_FUA,
    };
    if h.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && t.read_only {
        return Err(EPERM);
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= t.size);
    let past_end = |errno| if in_range { Ok(()) } else { Err(errno) };
    let (offset, len) = (h.offset, h.len);
    match h.kind {
        CMD_READ => past_end(EINVAL).map(|()| Command::Read { offset, len }),
        CMD_WRITE => past_end(ENOSPC).map(|()| Command::Write { offset, len, fua }),
        CMD_TRIM => past_end(EINVAL).map(|()| Command::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES => past_end(ENOSPC).map(|()| Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        }),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_DISC => Ok(Command::Disconnect),
        _ => Err(EINVAL),
    }
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// A simple reply (success when `error` is 0).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// The bytes that precede `len` bytes of data in a successful READ reply.
pub fn encode_read_reply_header(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    offset: u64,
    len: u32,
) {
    if structured {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        out.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&(len.saturating_add(8)).to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
    } else {
        encode_simple_reply(out, cookie, 0);
    }
}

/// An error reply. With structured replies, a READ's error is an NBD_REPLY_TYPE_ERROR chunk
/// (a simple reply is not allowed for reads there); other commands use simple replies.
pub fn encode_error_reply(
    out: &mut Vec<u8>,
    structured: bool,
    read: bool,
    cookie: u64,
    error: u32,
) {
    if structured && read {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        out.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&6u32.to_be_bytes());
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
    } else {
        encode_simple_reply(out, cookie, error);
    }
}

/// A reply as a client sees it (client side: tests, fuzzing, tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    Simple {
        cookie: u64,
        error: u32,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        kind: u16,
        payload: &'a [u8],
    },
}

/// Decode one reply. A simple reply's data (for a READ) is not framed, so the caller passes
/// `simple_data_len`: how many data bytes follow a successful simple reply (0 if not a READ).
/// Returns the reply, the data of a successful simple READ reply, and bytes consumed.
#[allow(clippy::type_complexity)]
pub fn decode_reply(
    buf: &[u8],
    simple_data_len: usize,
) -> Result<Option<(Reply<'_>, &[u8], usize)>, FatalError> {
    let Some(magic) = be_u32(buf, 0) else {
        return Ok(None);
    };
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let (Some(error), Some(cookie)) = (be_u32(buf, 4), be_u64(buf, 8)) else {
                return Ok(None);
            };
            let data_len = if error == 0 { simple_data_len } else { 0 };
            let Some(data) = buf.get(SIMPLE_REPLY_LEN..SIMPLE_REPLY_LEN + data_len) else {
                return Ok(None);
            };
            Ok(Some((
                Reply::Simple { cookie, error },
                data,
                SIMPLE_REPLY_LEN + data_len,
            )))
        }
        STRUCTURED_REPLY_MAGIC => {
            let (Some(flags), Some(kind), Some(cookie), Some(len)) = (
                be_u16(buf, 4),
                be_u16(buf, 6),
                be_u64(buf, 8),
                be_u32(buf, 16),
            ) else {
                return Ok(None);
            };
            let end = STRUCTURED_REPLY_HEADER_LEN.saturating_add(len as usize);
            let Some(payload) = buf.get(STRUCTURED_REPLY_HEADER_LEN..end) else {
                return Ok(None);
            };
            Ok(Some((
                Reply::Chunk {
                    cookie,
                    flags,
                    kind,
                    payload,
                },
                &[],
                end,
            )))
        }
        m => Err(FatalError::BadMagic(m)),
    }
}

#[cfg(test)]
mod tests;
