//! The WebSocket protocol of docs/API.md: what clients send, what the server
//! sends, and the two encodings: JSON text frames, or MessagePack binary frames
//! of the same shapes for clients that ask for the `gavel.msgpack` subprotocol.
//!
//! Server messages leave as complete WebSocket frames ("wire" bytes). Server
//! frames are not masked, so the bytes of an event are the same for every
//! subscriber: they are built once and shared.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use gavel_actors::{AuctionId, AuctionState, Event};
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use uuid::Uuid;

use super::frame::{OPCODE_BINARY, OPCODE_TEXT, frame_into};
pub use crate::events::Version;
use crate::http::views::{AuctionView, BidResultView, BidView, UserView, timestamp};

pub const MSGPACK_PROTOCOL: &str = "gavel.msgpack";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MsgPack,
}

/// Everything a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Auth {
        token: String,
    },
    Subscribe {
        auction_id: String,
        since_seq: Option<u64>,
    },
    Unsubscribe {
        auction_id: String,
    },
    Bid {
        request_id: String,
        auction_id: String,
        amount: Number,
        max_amount: Option<Number>,
    },
    /// A struct variant, so that `deny_unknown_fields` holds for it too.
    Ping {},
}

/// Everything the server sends. Auction messages carry `auction_id`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Snapshot {
        auction_id: Uuid,
        auction: Box<AuctionView>,
        /// The last (at most 10) bids, newest first.
        recent_bids: Vec<BidView>,
        viewers: u64,
        server_time: String,
    },
    Bid {
        auction_id: Uuid,
        seq: u64,
        current_price: i64,
        leader: UserView,
        bid_count: u64,
        end_at: String,
        reserve_met: bool,
        placed_at: String,
    },
    Extended {
        auction_id: Uuid,
        seq: u64,
        end_at: String,
    },
    Started {
        auction_id: Uuid,
        seq: u64,
    },
    Ended {
        auction_id: Uuid,
        seq: u64,
        winner: Option<UserView>,
        final_price: Option<i64>,
        reserve_met: bool,
    },
    Cancelled {
        auction_id: Uuid,
        seq: u64,
    },
    Viewers {
        auction_id: Uuid,
        count: u64,
    },
    Outbid {
        auction_id: Uuid,
        current_price: i64,
        seq: u64,
    },
    Won {
        auction_id: Uuid,
        final_price: i64,
        seq: u64,
    },
    BidResult {
        request_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<BidResultView>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<Value>,
    },
    Authenticated {
        user: UserView,
    },
    Pong {
        server_time: String,
    },
    Error {
        code: &'static str,
        message: String,
        /// The auction a failed `subscribe` named.
        #[serde(skip_serializing_if = "Option::is_none")]
        auction_id: Option<Uuid>,
    },
}

impl ServerMessage {
    pub fn error(code: &'static str, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error { code, message: message.into(), auction_id: None }
    }

    /// The message as one complete WebSocket frame.
    pub fn encode(&self, encoding: Encoding) -> Bytes {
        let mut wire = Vec::with_capacity(256);
        self.encode_into(encoding, &mut wire);
        Bytes::from(wire)
    }

    fn encode_into(&self, encoding: Encoding, wire: &mut Vec<u8>) {
        let payload = match encoding {
            Encoding::Json => serde_json::to_vec(self).expect("server messages always serialise to JSON"),
            Encoding::MsgPack => to_msgpack(self),
        };
        let opcode = match encoding {
            Encoding::Json => OPCODE_TEXT,
            Encoding::MsgPack => OPCODE_BINARY,
        };
        frame_into(opcode, &payload, wire);
    }
}

/// MessagePack with named fields and the same textual forms as JSON (UUIDs
/// and times as strings): the same shapes in both encodings.
pub fn to_msgpack(value: &impl Serialize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(256);
    let mut serializer = rmp_serde::Serializer::new(&mut bytes).with_struct_map().with_human_readable();
    value.serialize(&mut serializer).expect("server messages always serialise to MessagePack");
    bytes
}

enum Body {
    Event(Event),
    Viewers(u64),
}

/// One durable event (or a viewer count) as every subscriber gets it. It is
/// encoded at most once per encoding, by whichever subscriber needs it first,
/// and the bytes are shared by all of them.
pub struct Frame {
    pub auction_id: AuctionId,
    /// `None` for viewer counts, which are not part of the ordered sequence.
    pub version: Option<Version>,
    /// The `seq` of the bid this frame carries, if it is a bid.
    pub bid_seq: Option<u64>,
    body: Body,
    json: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
}

impl Frame {
    pub fn event(event: &Event, state: &AuctionState) -> Frame {
        let (version, bid_seq) = match event {
            Event::BidPlaced(placed) => (Version { seq: placed.seq, stage: 1 }, Some(placed.seq)),
            Event::Started { seq } => (Version { seq: *seq, stage: 1 }, None),
            Event::Ended { seq, .. } | Event::Cancelled { seq } => (Version { seq: *seq, stage: 2 }, None),
        };
        Frame {
            auction_id: state.id,
            version: Some(version),
            bid_seq,
            body: Body::Event(event.clone()),
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    pub fn viewers(auction_id: AuctionId, count: u64) -> Frame {
        Frame {
            auction_id,
            version: None,
            bid_seq: None,
            body: Body::Viewers(count),
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// How many messages the frame carries (a bid that moved the end: two).
    pub fn message_count(&self) -> u64 {
        match &self.body {
            Body::Event(Event::BidPlaced(placed)) if placed.extended => 2,
            _ => 1,
        }
    }

    /// True for lifecycle events (start, end, cancel).
    pub fn is_lifecycle(&self) -> bool {
        self.version.is_some() && self.bid_seq.is_none()
    }

    /// The frame's messages as wire bytes, built on first use.
    pub fn wire(&self, encoding: Encoding) -> &Bytes {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| {
            let mut wire = Vec::with_capacity(320);
            for message in self.messages() {
                message.encode_into(encoding, &mut wire);
            }
            Bytes::from(wire)
        })
    }

    fn messages(&self) -> Vec<ServerMessage> {
        let auction_id = self.auction_id;
        match &self.body {
            Body::Viewers(count) => vec![ServerMessage::Viewers { auction_id, count: *count }],
            Body::Event(event) => match event {
                Event::BidPlaced(placed) => {
                    let mut messages = vec![ServerMessage::Bid {
                        auction_id,
                        seq: placed.seq,
                        current_price: placed.current_price.minor_units(),
                        leader: UserView::from(&placed.leader),
                        bid_count: placed.bid_count,
                        end_at: timestamp(placed.end_at_ms),
                        reserve_met: placed.reserve_met,
                        placed_at: timestamp(placed.placed_at_ms),
                    }];
                    if placed.extended {
                        messages.push(ServerMessage::Extended {
                            auction_id,
                            seq: placed.seq,
                            end_at: timestamp(placed.end_at_ms),
                        });
                    }
                    messages
                }
                Event::Started { seq } => vec![ServerMessage::Started { auction_id, seq: *seq }],
                Event::Ended { seq, winner, final_price, reserve_met } => vec![ServerMessage::Ended {
                    auction_id,
                    seq: *seq,
                    winner: winner.as_ref().map(UserView::from),
                    final_price: final_price.map(|price| price.minor_units()),
                    reserve_met: *reserve_met,
                }],
                Event::Cancelled { seq } => vec![ServerMessage::Cancelled { auction_id, seq: *seq }],
            },
        }
    }
}

/// What the fan-out sends at once: the events of one auction published since
/// the previous batch (in order), as one buffer of wire bytes that every
/// subscriber writes with a single system call.
pub struct Batch {
    pub auction_id: AuctionId,
    pub frames: Vec<Arc<Frame>>,
    /// No frames: the node may have missed events of the auction (from another
    /// node); each subscriber takes a fresh snapshot instead.
    pub resync: bool,
    /// No frames: the auction's owner (another node) says its last event, a
    /// while ago, brought it to this version. A subscriber shown less missed
    /// events on the way here, and takes a fresh snapshot.
    pub head: Option<Version>,
    json: OnceLock<(Bytes, Vec<usize>)>,
    msgpack: OnceLock<(Bytes, Vec<usize>)>,
    /// The whole batch compressed (`permessage-deflate`), per encoding.
    json_deflated: OnceLock<Bytes>,
    msgpack_deflated: OnceLock<Bytes>,
}

impl Batch {
    pub fn new(auction_id: AuctionId, frames: Vec<Arc<Frame>>) -> Batch {
        Batch {
            auction_id,
            frames,
            resync: false,
            head: None,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
            json_deflated: OnceLock::new(),
            msgpack_deflated: OnceLock::new(),
        }
    }

    /// Tells every subscriber of the auction to take a fresh snapshot.
    pub fn resync(auction_id: AuctionId) -> Batch {
        Batch { resync: true, ..Batch::new(auction_id, Vec::new()) }
    }

    /// Tells every subscriber where the auction's owner stands (`head`).
    pub fn head(auction_id: AuctionId, version: Version) -> Batch {
        Batch { head: Some(version), ..Batch::new(auction_id, Vec::new()) }
    }

    /// Every message of the batch, compressed as one stream that starts with
    /// the batch (see `deflate`): right for a connection that negotiated
    /// `permessage-deflate` and is shown the whole batch. Built once.
    pub fn deflated_wire(&self, encoding: Encoding) -> &Bytes {
        let cell = match encoding {
            Encoding::Json => &self.json_deflated,
            Encoding::MsgPack => &self.msgpack_deflated,
        };
        cell.get_or_init(|| Bytes::from(super::deflate::compress_frames(&self.wire(encoding).0)))
    }

    /// The wire bytes of every frame, and where each frame starts in them.
    pub fn wire(&self, encoding: Encoding) -> &(Bytes, Vec<usize>) {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| {
            if let [only] = self.frames.as_slice() {
                return (only.wire(encoding).clone(), vec![0]);
            }
            let mut wire = Vec::with_capacity(self.frames.len() * 320);
            let mut starts = Vec::with_capacity(self.frames.len());
            for frame in &self.frames {
                starts.push(wire.len());
                wire.extend_from_slice(frame.wire(encoding));
            }
            (Bytes::from(wire), starts)
        })
    }
}

/// The private messages an event causes: `outbid` to whoever just lost the
/// lead, `won` to the winner.
pub fn private_messages(event: &Event, auction_id: AuctionId) -> Option<(Uuid, ServerMessage)> {
    match event {
        Event::BidPlaced(placed) => placed.outbid.as_ref().map(|outbid| {
            let message = ServerMessage::Outbid {
                auction_id,
                current_price: placed.current_price.minor_units(),
                seq: placed.seq,
            };
            (outbid.id, message)
        }),
        Event::Ended { seq, winner: Some(winner), final_price: Some(price), .. } => {
            let message = ServerMessage::Won { auction_id, final_price: price.minor_units(), seq: *seq };
            Some((winner.id, message))
        }
        _ => None,
    }
}

/// Whether `frames` continue the sequence from `shown` without a gap: each
/// bid raises `seq` by one, each start, end or cancel moves the stage at the
/// same `seq`. A node's own auctions always do; events that crossed Redis
/// might not.
pub fn follows_on(shown: Version, frames: &[Arc<Frame>]) -> bool {
    let mut last = shown;
    for frame in frames {
        let Some(version) = frame.version else { continue };
        let next = if frame.is_lifecycle() {
            version.seq == last.seq && version.stage > last.stage
        } else {
            version.seq == last.seq + 1 && version.stage == last.stage
        };
        if !next {
            return false;
        }
        last = version;
    }
    true
}
