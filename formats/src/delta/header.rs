//! The delta file header: the shared prefix, then the volume and the from/to checkpoints.

use std::mem::offset_of;
use std::path::Path;

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    HEADER_LEN, KNOWN_INCOMPAT_FEATURES, MAGIC, MAJOR_VERSION, MAX_CHECKPOINT_NAME,
    MAX_RECORD_DATA, MINOR_VERSION,
};
use crate::bitmap::{MAX_GRANULARITY, MAX_VOLUME_SIZE, MIN_GRANULARITY};
use crate::error::{FormatError, FormatErrorKind, InvalidField};
use crate::header::{self, HeaderFormat, RawHeaderPrefix};

const FLAG_HAS_FROM: u32 = 1;
/// The shared header prefix as this format fills it.
const FORMAT: HeaderFormat = HeaderFormat {
    what: "delta file",
    header: "delta header",
    magic: MAGIC,
    major: MAJOR_VERSION,
    minor: MINOR_VERSION,
    known_incompat: KNOWN_INCOMPAT_FEATURES,
};

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RawDeltaHeader {
    prefix: RawHeaderPrefix, // 0: "TDMKDLTA" 1.0, header_len 616, features, header crc
    flags: U32,              // 36: bit 0 = incremental (a "from" checkpoint is present)
    volume_uuid: [u8; 16],   // 40: the volume's uuid
    volume_size: U64,        // 56: volume size in bytes
    granularity: U32,        // 64: tracking block size, power of two 4 KiB..=1 MiB
    max_record_data: U32,    // 68: 4 MiB, the writer's data record bound
    created_unix: U64,       // 72: creation time, seconds since the Unix epoch
    from_generation: U64,    // 80: generation of the "from" checkpoint (0 when full)
    to_generation: U64,      // 88: generation of the "to" checkpoint
    from_len: U16,           // 96: length of the "from" name (0 when full)
    to_len: U16,             // 98: length of the "to" name, 1..=255
    reserved: U32,           // 100: zero
    from_name: [u8; 256],    // 104: "from" checkpoint name, UTF-8, zero padded
    to_name: [u8; 256],      // 360: "to" checkpoint name, UTF-8, zero padded
}
const _: () = assert!(size_of::<RawDeltaHeader>() == 616);

/// A checkpoint a delta goes from or to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointRef {
    /// Checkpoint name, 1..=255 bytes of UTF-8 without NUL.
    pub name: String,
    /// Checkpoint generation.
    pub generation: u64,
}

/// A validated delta file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaHeader {
    /// The volume this delta was taken from.
    pub volume_uuid: Uuid,
    /// Volume size in bytes; every extent lies below it.
    pub volume_size: u64,
    /// Tracking block size of the bitmap the delta was cut from.
    pub granularity: u32,
    /// The checkpoint the changes are relative to; `None` for a full backup.
    pub from: Option<CheckpointRef>,
    /// The checkpoint (point in time) the delta brings a volume to.
    pub to: CheckpointRef,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

impl DeltaHeader {
    /// Checks every field against the format's limits.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.volume_size == 0 || self.volume_size > MAX_VOLUME_SIZE {
            return Err(InvalidField::new(
                "volume_size",
                format!("{} (must be 1..={MAX_VOLUME_SIZE})", self.volume_size),
            ));
        }
        let g = self.granularity;
        if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
            return Err(InvalidField::new(
                "granularity",
                format!("{g} (must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY})"),
            ));
        }
        if let Some(from) = &self.from {
            validate_name("from", &from.name)?;
        }
        validate_name("to", &self.to.name)
    }

    /// The header as exactly [`HEADER_LEN`] bytes, header crc included.
    ///
    /// Call [`DeltaHeader::validate`] first; names longer than the limit are cut.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_crc().0
    }

    /// [`DeltaHeader::encode`], and the header crc the trailer repeats.
    pub(super) fn encode_with_crc(&self) -> (Vec<u8>, u32) {
        let (from_len, from_name, from_generation) = match &self.from {
            Some(f) => {
                let (len, name) = name_field(&f.name);
                (len, name, f.generation)
            }
            None => (0, [0u8; 256], 0),
        };
        let (to_len, to_name) = name_field(&self.to.name);
        let raw = RawDeltaHeader {
            prefix: FORMAT.prefix(HEADER_LEN, 0, 0),
            flags: U32::new(if self.from.is_some() {
                FLAG_HAS_FROM
            } else {
                0
            }),
            volume_uuid: *self.volume_uuid.as_bytes(),
            volume_size: U64::new(self.volume_size),
            granularity: U32::new(self.granularity),
            max_record_data: U32::new(MAX_RECORD_DATA as u32),
            created_unix: U64::new(self.created_unix),
            from_generation: U64::new(from_generation),
            to_generation: U64::new(self.to.generation),
            from_len: U16::new(from_len),
            to_len: U16::new(to_len),
            reserved: U32::new(0),
            from_name,
            to_name,
        };
        let mut out = raw.as_bytes().to_vec();
        let crc = header::seal(&mut out);
        (out, crc)
    }

    /// Parses and validates a header from the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self, FormatError> {
        Self::parse_with_crc(bytes, file).map(|(h, _)| h)
    }

    pub(super) fn parse_with_crc(bytes: &[u8], file: &Path) -> Result<(Self, u32), FormatError> {
        let truncated = || {
            FormatError::new(
                file,
                bytes.len() as u64,
                FormatErrorKind::Truncated {
                    what: "delta header",
                    needed: HEADER_LEN as u64,
                    available: bytes.len() as u64,
                },
            )
        };
        let header = bytes.get(..HEADER_LEN).ok_or_else(truncated)?;
        let (raw, _) = RawDeltaHeader::read_from_prefix(header).map_err(|_| truncated())?;
        let crc = FORMAT.check(header, file)?;
        let field = |off: usize, e: InvalidField| FormatError::invalid(file, off as u64, e);
        let must = |off: usize, ok: bool, name: &'static str, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(field(off, InvalidField::new(name, why)))
            }
        };
        must(
            header::HEADER_LEN_AT,
            raw.prefix.header_len.get() == HEADER_LEN as u32,
            "header_len",
            "must be 616",
        )?;
        must(
            offset_of!(RawDeltaHeader, flags),
            raw.flags.get() & !FLAG_HAS_FROM == 0,
            "flags",
            "unknown flag bits",
        )?;
        must(
            offset_of!(RawDeltaHeader, max_record_data),
            raw.max_record_data.get() == MAX_RECORD_DATA as u32,
            "max_record_data",
            "must be 4194304",
        )?;
        must(
            offset_of!(RawDeltaHeader, reserved),
            raw.reserved.get() == 0,
            "reserved",
            "must be zero",
        )?;
        let has_from = raw.flags.get() & FLAG_HAS_FROM != 0;
        let from = if has_from {
            let name = parse_name(
                &raw.from_name,
                raw.from_len.get(),
                offset_of!(RawDeltaHeader, from_name),
                "from",
                file,
            )?;
            Some(CheckpointRef {
                name,
                generation: raw.from_generation.get(),
            })
        } else {
            must(
                offset_of!(RawDeltaHeader, from_len),
                raw.from_len.get() == 0 && raw.from_generation.get() == 0,
                "from",
                "a full backup has no from checkpoint",
            )?;
            if let Some(i) = raw.from_name.iter().position(|&b| b != 0) {
                return Err(field(
                    offset_of!(RawDeltaHeader, from_name) + i,
                    InvalidField::new("from", "a full backup has no from checkpoint"),
                ));
            }
            None
        };
        let to = CheckpointRef {
            name: parse_name(
                &raw.to_name,
                raw.to_len.get(),
                offset_of!(RawDeltaHeader, to_name),
                "to",
                file,
            )?,
            generation: raw.to_generation.get(),
        };
        let h = Self {
            volume_uuid: Uuid::from_bytes(raw.volume_uuid),
            volume_size: raw.volume_size.get(),
            granularity: raw.granularity.get(),
            from,
            to,
            created_unix: raw.created_unix.get(),
        };
        h.validate().map_err(|e| {
            let off = match e.field {
                "volume_size" => offset_of!(RawDeltaHeader, volume_size),
                "granularity" => offset_of!(RawDeltaHeader, granularity),
                "from" => offset_of!(RawDeltaHeader, from_name),
                _ => offset_of!(RawDeltaHeader, to_name),
            };
            field(off, e)
        })?;
        Ok((h, crc))
    }
}

fn validate_name(field: &'static str, name: &str) -> Result<(), InvalidField> {
    if name.is_empty() || name.len() > MAX_CHECKPOINT_NAME {
        return Err(InvalidField::new(
            field,
            format!(
                "checkpoint name is {} bytes (must be 1..={MAX_CHECKPOINT_NAME})",
                name.len()
            ),
        ));
    }
    if name.bytes().any(|b| b == 0) {
        return Err(InvalidField::new(
            field,
            "checkpoint name contains a NUL byte",
        ));
    }
    Ok(())
}

fn name_field(name: &str) -> (u16, [u8; 256]) {
    let mut out = [0u8; 256];
    let n = name.len().min(MAX_CHECKPOINT_NAME);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    (n as u16, out)
}

fn parse_name(
    raw: &[u8; 256],
    len: u16,
    at: usize,
    field: &'static str,
    file: &Path,
) -> Result<String, FormatError> {
    let len = usize::from(len);
    if len == 0 || len > MAX_CHECKPOINT_NAME {
        return Err(FormatError::invalid(
            file,
            at as u64,
            InvalidField::new(field, format!("name length {len} (must be 1..=255)")),
        ));
    }
    let (name, padding) = raw.split_at(len);
    let name = std::str::from_utf8(name).map_err(|e| {
        FormatError::invalid(
            file,
            (at + e.valid_up_to()) as u64,
            InvalidField::new(field, "checkpoint name is not UTF-8"),
        )
    })?;
    validate_name(field, name).map_err(|e| FormatError::invalid(file, at as u64, e))?;
    if let Some(i) = padding.iter().position(|&b| b != 0) {
        return Err(FormatError::invalid(
            file,
            (at + len + i) as u64,
            InvalidField::new(field, "non-zero bytes after the name"),
        ));
    }
    Ok(name.to_owned())
}
