//! WebSocket framing (RFC 6455, 5.2): the bytes around a message. The
//! protocol (`protocol.rs`) frames the server's messages with it, and
//! `permessage-deflate` (`deflate.rs`) frames what it compresses and
//! decompresses; neither needs the other for it.

pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_PING: u8 = 0x9;

/// Appends one final, unmasked frame (RFC 6455, 5.2) carrying `payload`.
pub fn frame_into(opcode: u8, payload: &[u8], wire: &mut Vec<u8>) {
    frame_header_into(0x80 | opcode, None, payload.len(), wire);
    wire.extend_from_slice(payload);
}

/// Appends a frame header (RFC 6455, 5.2): the first byte (FIN, RSV bits,
/// opcode), a 7-bit, 16-bit or 64-bit length, and the masking key if any.
pub fn frame_header_into(first: u8, mask: Option<[u8; 4]>, length: usize, wire: &mut Vec<u8>) {
    wire.push(first);
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match length {
        0..=125 => wire.push(masked | length as u8),
        126..=0xffff => {
            wire.push(masked | 126);
            wire.extend_from_slice(&(length as u16).to_be_bytes());
        }
        _ => {
            wire.push(masked | 127);
            wire.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    if let Some(mask) = mask {
        wire.extend_from_slice(&mask);
    }
}
