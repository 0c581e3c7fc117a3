//! Hard limits of the protocol. Both sides enforce them: the encoder refuses to build a frame
//! over a limit, the decoder rejects one. Servers may configure lower limits, never higher.

/// Bytes of an opaque message body. Clients encrypt end to end; the server never looks inside.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Bytes of an authentication token in `Hello`.
pub const TOKEN_BYTES_MAX: usize = 1024;

/// Bytes of an ephemeral signal's payload (typing, presence).
pub const SIGNAL_PAYLOAD_BYTES_MAX: usize = 256;

/// Bytes of a human-readable text in `Error` and `Goaway`.
pub const TEXT_BYTES_MAX: usize = 512;

/// Bytes of the address in `Goaway` that tells a client where to reconnect.
pub const ADDRESS_BYTES_MAX: usize = 256;

/// Bytes of one archived frame, without its length prefix: the largest body plus room for the
/// other fields of `Send` and `Deliver`.
pub const FRAME_BYTES_MAX: usize = BODY_BYTES_MAX + 1024;

/// Highest device number of one user; also bounds the connections one user may hold.
pub const DEVICE_ID_MAX: u32 = 63;

/// Longest time-to-live a sender may ask for. The server caps it further by its retention.
pub const TTL_SECS_MAX: u32 = 366 * 24 * 3600;

/// User ids are 64-bit numbers; 0 is reserved and never names a user.
pub const USER_ID_RESERVED: u64 = 0;

/// Client message ids are 64-bit numbers chosen by the sender, unique per sender; 0 is reserved.
pub const CLIENT_ID_RESERVED: u64 = 0;

const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(BODY_BYTES_MAX + TOKEN_BYTES_MAX <= FRAME_BYTES_MAX + 1024);
const _: () = assert!(SIGNAL_PAYLOAD_BYTES_MAX < BODY_BYTES_MAX);

/// Bytes of a `Hello` frame's body at most (a maximal token and the fields): before `Hello`,
/// a server buffers no more than this for a connection.
pub const HELLO_FRAME_BYTES_MAX: usize = TOKEN_BYTES_MAX + 1024;
