//! `permessage-deflate` (RFC 7692), shaped for fan-out.
//!
//! A hot auction's watchers all receive the same batches, so compression is
//! done once per batch, not once per connection: the batch's messages are
//! compressed as one deflate stream that starts afresh with the batch, each
//! message ending at a sync flush. The second and later messages of a batch
//! refer back to the first (a bid event repeats most of the one before it),
//! and nothing refers to what came before the batch, so the same bytes are
//! right for every connection that receives the whole batch: a client keeps
//! its window from one compressed message to the next (the server does not ask
//! for `server_no_context_takeover`) and that window ends with the batch's
//! earlier messages. A connection that gets only part of a batch (it joined
//! in the middle of one) gets that part uncompressed, which leaves its window
//! alone. So do replies, snapshots and private messages: only batches are
//! compressed, and no connection keeps a compressor.
//!
//! Clients may compress what they send. They are asked not to carry context
//! between messages (`client_no_context_takeover`), so each of their messages
//! inflates on its own and no connection keeps an inflater either. The
//! protocol layer (tungstenite) does not know the extension: [`ClientStream`]
//! sits under it and turns each compressed client message back into a plain
//! frame before tungstenite reads it, within the same size limit.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::frame_header_into;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";
/// What the server answers when it accepts an offer; an offer that named
/// `server_max_window_bits` (15) is answered with it (RFC 7692, 7.1.2.1).
const ANSWER: &str = "permessage-deflate; client_no_context_takeover";
const ANSWER_WITH_WINDOW: &str = "permessage-deflate; client_no_context_takeover; server_max_window_bits=15";
/// What a sync flush ends with; left off the wire (RFC 7692, 7.2.1).
const FLUSH_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Compressed bytes a client message may take: a little over the limit on
/// its inflated size, since deflate can grow what does not compress.
const COMPRESSED_SLACK: usize = 1024;
/// Frame header bits.
const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV_ALL: u8 = 0x70;
const MASKED: u8 = 0x80;

/// The `Sec-WebSocket-Extensions` answer to the first of the client's offers
/// (RFC 7692, 5) that this server can accept as it works: a window of 32 KiB,
/// context kept across the server's messages. Offers naming
/// `server_no_context_takeover`, a smaller `server_max_window_bits`, or a
/// parameter this server does not know are declined; with none left, the
/// connection goes uncompressed (`None`).
pub fn negotiate(offers: &[&str]) -> Option<&'static str> {
    offers.iter().flat_map(|header| header.split(',')).find_map(|offer| answer(offer.trim()))
}

fn answer(offer: &str) -> Option<&'static str> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next().is_some_and(|name| name.eq_ignore_ascii_case(EXTENSION)) {
        return None;
    }
    let window_bits = |bits: &str| {
        // 8 to 15, without leading zeros (RFC 7692, 7.1.2).
        !bits.starts_with('0')
            && bits.bytes().all(|byte| byte.is_ascii_digit())
            && bits.parse::<u8>().is_ok_and(|bits| (8..=15).contains(&bits))
    };
    let mut seen: Vec<String> = Vec::new();
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim().to_ascii_lowercase(), Some(value.trim().trim_matches('"'))),
            None => (parameter.to_ascii_lowercase(), None),
        };
        if seen.contains(&name) {
            return None;
        }
        let fine = match (name.as_str(), value) {
            // Both are about what the client sends: the answer asks it not
            // to keep context, whatever window it uses.
            ("client_no_context_takeover", None) => true,
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", Some(bits)) => window_bits(bits),
            ("server_max_window_bits", Some(bits)) => bits == "15",
            _ => false,
        };
        if !fine {
            return None;
        }
        seen.push(name);
    }
    Some(if seen.iter().any(|name| name == "server_max_window_bits") { ANSWER_WITH_WINDOW } else { ANSWER })
}

/// The messages of `wire` (complete, unmasked, unfragmented frames, as the
/// server builds them) compressed as one stream, each message a frame with
/// RSV1 set. The first message refers to nothing before it, the others to the
/// messages before them in `wire`.
pub fn compress_frames(wire: &[u8]) -> Vec<u8> {
    thread_local! {
        /// A compressor's state is a few hundred KiB: one per thread, reset
        /// for each batch, rather than one allocated and zeroed per batch.
        static COMPRESSOR: std::cell::RefCell<Compress> =
            std::cell::RefCell::new(Compress::new(Compression::default(), false));
    }
    COMPRESSOR.with(|compressor| {
        let mut compressor = compressor.borrow_mut();
        compressor.reset();
        compress_frames_with(&mut compressor, wire)
    })
}

fn compress_frames_with(compressor: &mut Compress, wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire.len() / 2 + 64);
    let mut payload = Vec::with_capacity(256);
    let mut rest = wire;
    while let Some((header, length)) = server_frame_header(rest) {
        let opcode = rest[0] & 0x0f;
        let message = &rest[header..header + length];
        rest = &rest[header + length..];
        payload.clear();
        deflate_message(compressor, message, &mut payload);
        frame_header_into(FIN | RSV1 | opcode, None, payload.len(), &mut out);
        out.extend_from_slice(&payload);
    }
    debug_assert!(rest.is_empty(), "only whole frames are compressed");
    out
}

/// Where the payload of the whole server frame at the start of `wire` begins
/// and how long it is.
fn server_frame_header(wire: &[u8]) -> Option<(usize, usize)> {
    let frame = FrameHeader::parse(wire)?;
    (wire.len() >= frame.header_length + frame.payload_length).then_some((frame.header_length, frame.payload_length))
}

/// Compresses one message into `out` and ends it with a sync flush, whose
/// empty stored block's four bytes are then dropped.
fn deflate_message(compressor: &mut Compress, message: &[u8], out: &mut Vec<u8>) {
    let start = compressor.total_in();
    loop {
        out.reserve(message.len() / 2 + 64);
        let consumed = (compressor.total_in() - start) as usize;
        compressor.compress_vec(&message[consumed..], out, FlushCompress::Sync).expect("deflate accepts any input");
        // Done when all input is in and the flush did not run out of room.
        if (compressor.total_in() - start) as usize == message.len() && out.len() < out.capacity() {
            break;
        }
    }
    // Shared bytes that ended otherwise would be wrong for every watcher.
    assert!(out.ends_with(&FLUSH_TAIL), "a sync flush ends with an empty stored block");
    out.truncate(out.len() - FLUSH_TAIL.len());
}

/// The client's side of a connection, as the protocol layer reads it. Without
/// the extension it is the socket itself. With it, every compressed message
/// of the client is inflated and handed on as one plain frame (masked with a
/// zero key, which changes nothing); everything else is handed on as it came.
/// Writes go straight to the socket.
pub struct ClientStream<S> {
    inner: S,
    inflating: Option<Box<Inflating>>,
}

impl<S> ClientStream<S> {
    pub fn new(inner: S, deflate: bool, max_message_bytes: usize) -> ClientStream<S> {
        let inflating = deflate.then(|| {
            Box::new(Inflating {
                max_message_bytes,
                raw: Vec::new(),
                ready: Vec::new(),
                handed: 0,
                message: None,
                ended: false,
            })
        });
        ClientStream { inner, inflating }
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

/// The state of a compressed connection's reading side. Bounded: `raw`
/// holds less than a frame plus one read, `message` at most one message's
/// compressed bytes, `ready` about one message.
struct Inflating {
    max_message_bytes: usize,
    /// Read from the socket, not yet looked at (at most one partial frame).
    raw: Vec<u8>,
    /// For the protocol layer, from `handed` on.
    ready: Vec<u8>,
    handed: usize,
    /// A compressed message whose last frame has not come yet: its opcode
    /// and its (unmasked) compressed bytes so far.
    message: Option<(u8, Vec<u8>)>,
    /// After something the protocol layer must refuse: it is handed what it
    /// refuses (already in `ready`), then the end of the stream, so that it
    /// stops reading (it would take the client's next bytes as the rest of a
    /// frame it refused) and the connection closes at once.
    ended: bool,
}

/// A frame's header, parsed (a client's is masked, the server's is not).
struct FrameHeader {
    first: u8,
    mask: Option<[u8; 4]>,
    header_length: usize,
    payload_length: usize,
}

impl FrameHeader {
    fn parse(raw: &[u8]) -> Option<FrameHeader> {
        let second = *raw.get(1)?;
        let (mut header_length, payload_length) = match second & 0x7f {
            126 => (4, u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]) as usize),
            127 => (10, usize::try_from(u64::from_be_bytes(raw.get(2..10)?.try_into().ok()?)).unwrap_or(usize::MAX)),
            short => (2, short as usize),
        };
        let mask = if second & MASKED != 0 {
            let key: [u8; 4] = raw.get(header_length..header_length + 4)?.try_into().ok()?;
            header_length += 4;
            Some(key)
        } else {
            None
        };
        Some(FrameHeader { first: raw[0], mask, header_length, payload_length })
    }

    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }

    fn is_final(&self) -> bool {
        self.first & FIN != 0
    }
}

impl Inflating {
    /// Turns the complete frames in `raw` into what the protocol layer reads,
    /// until about one message's worth is waiting for it.
    fn process(&mut self) {
        loop {
            if self.ready.len() - self.handed >= self.max_message_bytes {
                return;
            }
            if self.ended {
                self.raw.clear();
                return;
            }
            let Some(frame) = FrameHeader::parse(&self.raw) else { return };
            if frame.payload_length > self.max_message_bytes + COMPRESSED_SLACK {
                // The protocol layer refuses the frame by its header (1009).
                self.ready.extend_from_slice(&self.raw[..frame.header_length]);
                self.ended = true;
                continue;
            }
            let length = frame.header_length + frame.payload_length;
            if self.raw.len() < length {
                return;
            }
            let is_control = frame.opcode() & 0x08 != 0;
            let rsv = frame.first & RSV_ALL;
            match (&mut self.message, frame.mask) {
                // Control frames may come between the frames of a message.
                _ if is_control => self.ready.extend_from_slice(&self.raw[..length]),
                (None, Some(mask)) if rsv == RSV1 && matches!(frame.opcode(), 0x1 | 0x2) => {
                    let payload = unmasked(&self.raw[frame.header_length..length], mask);
                    self.message = Some((frame.opcode(), payload));
                }
                (Some((_, compressed)), Some(mask)) if rsv == 0 && frame.opcode() == 0x0 => {
                    compressed.extend_from_slice(&unmasked(&self.raw[frame.header_length..length], mask));
                }
                // Anything else while a compressed message is open breaks the
                // protocol: the protocol layer is shown a frame it refuses (1002).
                (Some(_), _) => {
                    self.refuse();
                    continue;
                }
                // Plain frames, and compressed ones the protocol layer should
                // refuse (unmasked, other reserved bits), as they came.
                (None, _) => self.ready.extend_from_slice(&self.raw[..length]),
            }
            self.raw.drain(..length);
            let open_length = self.message.as_ref().map(|(_, compressed)| compressed.len());
            match open_length {
                Some(compressed) if compressed > self.max_message_bytes + COMPRESSED_SLACK => self.too_big(),
                Some(_) if frame.is_final() && !is_control => self.finish_message(),
                _ => {}
            }
        }
    }

    /// Inflates the complete compressed message into one plain frame.
    fn finish_message(&mut self) {
        let Some((opcode, mut compressed)) = self.message.take() else { return };
        compressed.extend_from_slice(&FLUSH_TAIL);
        let mut inflater = Decompress::new(false);
        let limit = self.max_message_bytes;
        let mut payload = Vec::new();
        loop {
            if payload.len() > limit {
                return self.too_big();
            }
            payload.reserve((limit + 1 - payload.len()).min(16 * 1024));
            let (in_before, out_before) = (inflater.total_in(), payload.len());
            let status =
                inflater.decompress_vec(&compressed[in_before as usize..], &mut payload, FlushDecompress::Sync);
            let progressed = inflater.total_in() != in_before || payload.len() != out_before;
            let all_in = inflater.total_in() as usize == compressed.len();
            match status {
                Err(_) => return self.refuse(),
                // The client ended its stream with a final block: all there is.
                Ok(Status::StreamEnd) => break,
                Ok(_) if progressed => {}
                // Everything is in, and nothing more comes out.
                Ok(_) if all_in => break,
                // Input left that does not decode any further.
                Ok(_) => return self.refuse(),
            }
        }
        if payload.len() > limit {
            return self.too_big();
        }
        frame_header_into(FIN | opcode, Some([0; 4]), payload.len(), &mut self.ready);
        self.ready.extend_from_slice(&payload);
    }

    /// Shows the protocol layer a frame header larger than it takes (1009).
    fn too_big(&mut self) {
        self.message = None;
        frame_header_into(FIN | 0x1, Some([0; 4]), self.max_message_bytes + 1, &mut self.ready);
        self.ended = true;
    }

    /// Shows the protocol layer a frame with a reserved bit it refuses (1002).
    fn refuse(&mut self) {
        self.message = None;
        frame_header_into(FIN | RSV1 | 0x1, Some([0; 4]), 0, &mut self.ready);
        self.ended = true;
    }
}

fn unmasked(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    payload.iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key).collect()
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(state) = this.inflating.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if state.handed < state.ready.len() {
                let count = buf.remaining().min(state.ready.len() - state.handed);
                buf.put_slice(&state.ready[state.handed..state.handed + count]);
                state.handed += count;
                if state.handed == state.ready.len() {
                    // Nothing kept between messages: a watcher that sent its
                    // subscriptions and now only listens costs no buffers.
                    state.ready = Vec::new();
                    state.handed = 0;
                }
                return Poll::Ready(Ok(()));
            }
            state.process();
            if state.raw.is_empty() {
                state.raw = Vec::new();
            }
            if !state.ready.is_empty() {
                continue;
            }
            if state.ended {
                return Poll::Ready(Ok(()));
            }
            // `raw` now holds less than a frame: read more.
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The end: what is left of a frame goes on as it is (the
                // protocol layer sees it cut short), then the end itself.
                if state.raw.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                state.message = None;
                state.ready.append(&mut state.raw);
                continue;
            }
            state.raw.extend_from_slice(read.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{OPCODE_BINARY, OPCODE_TEXT, frame_into};

    fn plain_frames(messages: &[&str]) -> Vec<u8> {
        let mut wire = Vec::new();
        for message in messages {
            frame_into(OPCODE_TEXT, message.as_bytes(), &mut wire);
        }
        wire
    }

    /// Reads compressed server frames as a client does: one inflater, its
    /// window kept from message to message.
    fn client_reads(inflater: &mut Decompress, mut wire: &[u8]) -> Vec<String> {
        let mut messages = Vec::new();
        while let Some((header, length)) = server_frame_header(wire) {
            assert_eq!(wire[0] & RSV1, RSV1, "every message of a batch is compressed");
            let mut compressed = wire[header..header + length].to_vec();
            compressed.extend_from_slice(&FLUSH_TAIL);
            let mut out = Vec::with_capacity(64 * 1024);
            inflater.decompress_vec(&compressed, &mut out, FlushDecompress::Sync).expect("inflates");
            messages.push(String::from_utf8(out).expect("text"));
            wire = &wire[header + length..];
        }
        messages
    }

    #[test]
    fn a_batch_inflates_after_any_history_and_the_later_messages_cost_little() {
        let events: Vec<String> = (1..=20)
            .map(|seq| {
                format!(
                    r#"{{"type":"bid","auction_id":"019ad3f0-6a4c-7b42-9d1e-3c5a7f00e1aa","seq":{seq},"current_price":{},"leader":{{"id":"019ad3f0-6a4c-7b42-9d1e-3c5a7f00{seq:04}","username":"bidder_{seq}"}},"bid_count":{seq},"end_at":"2026-12-01T10:00:00.000Z","reserve_met":true,"placed_at":"2026-12-01T09:00:00.{seq:03}Z"}}"#,
                    1_000 + seq * 10
                )
            })
            .collect();
        let texts: Vec<&str> = events.iter().map(String::as_str).collect();
        let plain = plain_frames(&texts);
        let compressed = compress_frames(&plain);
        assert!(compressed.len() * 3 < plain.len(), "{} bytes compressed from {}", compressed.len(), plain.len());

        // Two clients with different histories read the same bytes.
        let mut fresh = Decompress::new(false);
        assert_eq!(client_reads(&mut fresh, &compressed), events);
        let mut seasoned = Decompress::new(false);
        let earlier = compress_frames(&plain_frames(&["{\"type\":\"viewers\",\"count\":3}", &events[5]]));
        client_reads(&mut seasoned, &earlier);
        assert_eq!(client_reads(&mut seasoned, &compressed), events);
        assert_eq!(client_reads(&mut seasoned, &compressed), events, "and the same batch again");
    }

    #[test]
    fn binary_frames_stay_binary() {
        let mut plain = Vec::new();
        frame_into(OPCODE_BINARY, &[0x82, 0xa4, b't', b'y', b'p', b'e'], &mut plain);
        frame_into(OPCODE_BINARY, &[0x82, 0xa4, b't', b'y', b'p', b'e', 0x01], &mut plain);
        let compressed = compress_frames(&plain);
        let (header, length) = server_frame_header(&compressed).expect("a frame");
        assert_eq!(compressed[0], FIN | RSV1 | OPCODE_BINARY);
        let second = &compressed[header + length..];
        assert_eq!(second[0], FIN | RSV1 | OPCODE_BINARY);
        let mut inflater = Decompress::new(false);
        let mut out = Vec::new();
        for frame in [&compressed[header..header + length], &second[2..]] {
            let mut bytes = frame.to_vec();
            bytes.extend_from_slice(&FLUSH_TAIL);
            let mut message = Vec::with_capacity(1024);
            inflater.decompress_vec(&bytes, &mut message, FlushDecompress::Sync).expect("inflates");
            out.push(message);
        }
        assert_eq!(out, [vec![0x82, 0xa4, b't', b'y', b'p', b'e'], vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0x01]]);
    }

    #[test]
    fn offers_are_accepted_only_as_the_server_works() {
        let plain = Some("permessage-deflate; client_no_context_takeover");
        assert_eq!(negotiate(&["permessage-deflate"]), plain);
        assert_eq!(negotiate(&["permessage-deflate; client_max_window_bits"]), plain);
        assert_eq!(negotiate(&["Permessage-Deflate; client_max_window_bits=12; client_no_context_takeover"]), plain);
        // A window the client asked for is named in the answer.
        assert_eq!(
            negotiate(&["permessage-deflate; server_max_window_bits=\"15\""]),
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=15")
        );
        // The first acceptable offer, over several header lines.
        assert_eq!(
            negotiate(&[
                "x-webkit-deflate-frame",
                "permessage-deflate; server_no_context_takeover, permessage-deflate"
            ]),
            plain
        );
        for declined in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "permessage-deflate; mystery",
        ] {
            assert_eq!(negotiate(&[declined]), None, "{declined}");
        }
        assert_eq!(negotiate(&[]), None);
    }

    /// A client frame: masked with `mask`, `first` holding FIN, RSV and opcode.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame_header_into(first, Some(mask), payload.len(), &mut frame);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key));
        frame
    }

    fn deflated(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        deflate_message(&mut Compress::new(Compression::default(), false), text, &mut out);
        out
    }

    fn inflate_all(bytes: &[u8], max: usize) -> Vec<u8> {
        let mut state = ClientStream::new((), true, max).inflating.expect("deflate on");
        // Byte by byte: frames cut anywhere come out the same.
        for byte in bytes {
            state.raw.push(*byte);
            state.process();
        }
        state.ready
    }

    #[test]
    fn compressed_client_messages_become_plain_frames_and_the_rest_passes_as_it_came() {
        let text = br#"{"type":"subscribe","auction_id":"019ad3f0-6a4c-7b42-9d1e-3c5a7f00e1aa"}"#;
        let compressed = deflated(text);
        let (head, tail) = compressed.split_at(compressed.len() / 2);
        let ping = client_frame(FIN | 0x9, b"hi", [9, 8, 7, 6]);
        let plain = client_frame(FIN | 0x1, b"{\"type\":\"ping\"}", [1, 2, 3, 4]);
        let mut input = client_frame(RSV1 | 0x1, head, [4, 3, 2, 1]);
        input.extend(&ping);
        input.extend(client_frame(FIN, tail, [5, 6, 7, 8]));
        input.extend(&plain);

        let mut expected = ping.clone();
        frame_header_into(FIN | 0x1, Some([0; 4]), text.len(), &mut expected);
        expected.extend_from_slice(text);
        expected.extend(&plain);
        assert_eq!(inflate_all(&input, 16 * 1024), expected);
    }

    #[tokio::test]
    async fn after_a_refusal_the_protocol_layer_reads_the_end_of_the_stream() {
        use tokio::io::AsyncReadExt;
        let bomb = deflated(&vec![b'a'; 64 * 1024]);
        let mut input = client_frame(FIN | RSV1 | 0x1, &bomb, [1, 1, 1, 1]);
        input.extend(client_frame(FIN | 0x8, &1000u16.to_be_bytes(), [2, 2, 2, 2]));
        let input: &'static [u8] = Box::leak(input.into_boxed_slice());
        let mut stream = ClientStream::new(input, true, 16 * 1024);
        let mut read = Vec::new();
        stream.read_to_end(&mut read).await.expect("reads");
        let mut expected = Vec::new();
        frame_header_into(FIN | 0x1, Some([0; 4]), 16 * 1024 + 1, &mut expected);
        assert_eq!(read, expected, "the refused header, then the end: the client's close is not taken as its payload");

        // Incompressible bytes grow a little when deflated: still within the limit.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..16 * 1024)
            .map(|_| {
                // xorshift64: bytes deflate cannot shrink.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 56) as u8
            })
            .collect();
        let compressed = deflated(&noise);
        assert!(compressed.len() > noise.len(), "it grew");
        let plain = inflate_all(&client_frame(FIN | RSV1 | 0x2, &compressed, [3, 3, 3, 3]), 16 * 1024);
        let parsed = FrameHeader::parse(&plain).expect("a frame");
        assert_eq!((parsed.opcode(), parsed.payload_length), (0x2, noise.len()));
        assert_eq!(&plain[parsed.header_length..], &noise[..]);
    }

    #[test]
    fn a_message_that_inflates_past_the_limit_or_does_not_inflate_is_refused() {
        let bomb = deflated(&vec![b'a'; 64 * 1024]);
        assert!(bomb.len() < 1024, "a small frame");
        let refused = inflate_all(&client_frame(FIN | RSV1 | 0x1, &bomb, [1, 1, 1, 1]), 16 * 1024);
        let parsed = FrameHeader::parse(&refused).expect("a frame header");
        assert_eq!(parsed.payload_length, 16 * 1024 + 1, "a header the protocol layer refuses as too big");

        let garbage = inflate_all(&client_frame(FIN | RSV1 | 0x1, &[0xff; 40], [1, 2, 3, 4]), 16 * 1024);
        assert_eq!(garbage[0], FIN | RSV1 | 0x1, "a frame the protocol layer refuses for its reserved bit");

        let mut interleaved = client_frame(RSV1 | 0x1, b"\x01\x02", [0; 4]);
        interleaved.extend(client_frame(FIN | 0x1, b"new message", [0; 4]));
        let refused = inflate_all(&interleaved, 16 * 1024);
        assert_eq!(refused[0], FIN | RSV1 | 0x1, "a new message inside a compressed one is refused");
    }
}
