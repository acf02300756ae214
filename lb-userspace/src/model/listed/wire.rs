//! The protobuf wire format, as far as the kube source reads it: fields of
//! a message one after another, and the envelope an API server wraps an
//! object or a list in (`k8s\0`, then a `runtime.Unknown` holding the
//! type's name and the message).
//!
//! Only what `k8s.io/api`'s messages use: varints (`int32`, `int64`,
//! `bool`) and length-delimited fields (strings, bytes, messages, map
//! entries); fixed-width fields are skipped by their width, groups are
//! refused.

/// A protobuf body that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The body does not start with the API server's `k8s\0`.
    #[error("not a Kubernetes protobuf body (no `k8s\\0` at its start)")]
    NoMagic,
    /// A field or a length runs past the end of its message.
    #[error("{0} is cut short")]
    Truncated(&'static str),
    /// A field of a wire type the message does not give it.
    #[error("{message} field {field} has wire type {wire_type}, not {expected}")]
    WireType {
        /// The message read.
        message: &'static str,
        /// The field's number.
        field: u32,
        /// The wire type found.
        wire_type: u8,
        /// The wire type its schema gives it.
        expected: &'static str,
    },
    /// A string field that is not UTF-8.
    #[error("{0} holds a string that is not UTF-8")]
    NotUtf8(&'static str),
    /// The envelope names another type than the one asked for.
    #[error("the body holds a {found}, not a {expected}")]
    Kind {
        /// The type asked for.
        expected: &'static str,
        /// The type the envelope names.
        found: String,
    },
    /// A value out of the range its field allows.
    #[error("{0} is out of range")]
    Range(&'static str),
}

/// The value of one field, by its wire type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Value<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 2: a string, bytes, a message or a map entry.
    Bytes(&'a [u8]),
    /// Wire types 1 and 5: never read by the kube source's messages.
    Fixed,
}

/// The fields of one message, in order. MESSAGE names it in errors.
pub(super) struct Fields<'a> {
    rest: &'a [u8],
    message: &'static str,
}

impl<'a> Fields<'a> {
    pub(super) fn new(bytes: &'a [u8], message: &'static str) -> Self {
        Self {
            rest: bytes,
            message,
        }
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        // Most varints (keys, lengths, booleans) are one byte.
        if let Some((&byte, rest)) = self.rest.split_first()
            && byte < 0x80
        {
            self.rest = rest;
            return Ok(u64::from(byte));
        }
        let mut value = 0u64;
        for (index, &byte) in self.rest.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[index + 1..];
                return Ok(value);
            }
        }
        Err(WireError::Truncated(self.message))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], WireError> {
        let len = usize::try_from(len).map_err(|_| WireError::Truncated(self.message))?;
        if len > self.rest.len() {
            return Err(WireError::Truncated(self.message));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    /// The next field's number and value; `None` at the message's end.
    pub(super) fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, WireError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| WireError::Range(self.message))?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            other => {
                return Err(WireError::WireType {
                    message: self.message,
                    field,
                    #[expect(clippy::cast_possible_truncation, reason = "three bits")]
                    wire_type: other as u8,
                    expected: "a varint or length-delimited",
                });
            }
        };
        Ok(Some((field, value)))
    }

    /// How many fields numbered FIELD the rest of the message has (to
    /// size a repeated field's vector at once; 0 when it cannot be read).
    pub(super) fn count(&self, field: u32) -> usize {
        let mut ahead = Fields::new(self.rest, self.message);
        let mut count = 0;
        while let Ok(Some((number, _))) = ahead.next_field() {
            count += usize::from(number == field);
        }
        count
    }

    fn wrong(&self, field: u32, value: Value<'_>, expected: &'static str) -> WireError {
        WireError::WireType {
            message: self.message,
            field,
            wire_type: match value {
                Value::Varint(_) => 0,
                Value::Bytes(_) => 2,
                Value::Fixed => 1,
            },
            expected,
        }
    }

    /// VALUE of FIELD as bytes (a message, a map entry, `bytes`).
    pub(super) fn bytes(&self, field: u32, value: Value<'a>) -> Result<&'a [u8], WireError> {
        match value {
            Value::Bytes(bytes) => Ok(bytes),
            other => Err(self.wrong(field, other, "length-delimited")),
        }
    }

    /// VALUE of FIELD as a string.
    pub(super) fn str(&self, field: u32, value: Value<'a>) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes(field, value)?).map_err(|_| WireError::NotUtf8(self.message))
    }

    /// VALUE of FIELD as a varint.
    pub(super) fn varint_of(&self, field: u32, value: Value<'a>) -> Result<u64, WireError> {
        match value {
            Value::Varint(varint) => Ok(varint),
            other => Err(self.wrong(field, other, "varint")),
        }
    }

    /// VALUE of FIELD as an `int32`: the varint's low 32 bits, as Go's
    /// protobuf reads it (a negative `int32` is sent sign-extended to 64).
    pub(super) fn int32(&self, field: u32, value: Value<'a>) -> Result<i32, WireError> {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an int32 is the varint's low 32 bits"
        )]
        Ok(self.varint_of(field, value)? as i32)
    }

    /// VALUE of FIELD as an `int64`.
    pub(super) fn int64(&self, field: u32, value: Value<'a>) -> Result<i64, WireError> {
        #[expect(
            clippy::cast_possible_wrap,
            reason = "an int64 is the varint's 64 bits"
        )]
        Ok(self.varint_of(field, value)? as i64)
    }

    /// VALUE of FIELD as a `bool`.
    pub(super) fn bool(&self, field: u32, value: Value<'a>) -> Result<bool, WireError> {
        Ok(self.varint_of(field, value)? != 0)
    }
}

/// What the API server's envelope holds: the type's name and its message.
pub(super) struct Envelope<'a> {
    /// `typeMeta.kind`.
    pub(super) kind: &'a str,
    /// `raw`: the message.
    pub(super) raw: &'a [u8],
}

/// The prefix of every protobuf body an API server sends.
pub const MAGIC: &[u8; 4] = b"k8s\0";

/// Opens BODY's envelope.
pub(super) fn envelope(body: &[u8]) -> Result<Envelope<'_>, WireError> {
    let inner = body.strip_prefix(MAGIC).ok_or(WireError::NoMagic)?;
    let mut fields = Fields::new(inner, "runtime.Unknown");
    let mut envelope = Envelope { kind: "", raw: &[] };
    let mut has_raw = false;
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => {
                let mut type_meta = Fields::new(fields.bytes(field, value)?, "runtime.TypeMeta");
                while let Some((field, value)) = type_meta.next_field()? {
                    if field == 2 {
                        envelope.kind = type_meta.str(field, value)?;
                    }
                }
            }
            2 => {
                envelope.raw = fields.bytes(field, value)?;
                has_raw = true;
            }
            _ => {}
        }
    }
    // A body cut short after the type's name (the message is never left
    // out: an empty list still has its metadata).
    if !has_raw {
        return Err(WireError::Truncated("runtime.Unknown"));
    }
    Ok(envelope)
}

#[cfg(test)]
pub(crate) mod write {
    //! Protobuf bytes for the tests, field by field.

    /// A message being written.
    #[derive(Default)]
    pub(crate) struct Message(pub(crate) Vec<u8>);

    impl Message {
        fn varint(&mut self, mut value: u64) {
            while value >= 0x80 {
                #[expect(clippy::cast_possible_truncation, reason = "seven bits")]
                self.0.push((value as u8) | 0x80);
                value >>= 7;
            }
            #[expect(clippy::cast_possible_truncation, reason = "below 0x80")]
            self.0.push(value as u8);
        }

        /// FIELD as a varint.
        pub(crate) fn int(mut self, field: u32, value: i64) -> Self {
            self.varint(u64::from(field) << 3);
            #[expect(clippy::cast_sign_loss, reason = "protobuf sign-extends")]
            self.varint(value as u64);
            self
        }

        /// FIELD as length-delimited BYTES.
        pub(crate) fn bytes(mut self, field: u32, bytes: &[u8]) -> Self {
            self.varint(u64::from(field) << 3 | 2);
            self.varint(bytes.len() as u64);
            self.0.extend_from_slice(bytes);
            self
        }

        /// FIELD as a string.
        pub(crate) fn str(self, field: u32, text: &str) -> Self {
            self.bytes(field, text.as_bytes())
        }

        /// FIELD as a message.
        pub(crate) fn message(self, field: u32, message: &Self) -> Self {
            self.bytes(field, &message.0)
        }

        /// A map entry of FIELD.
        pub(crate) fn entry(self, field: u32, key: &str, value: &str) -> Self {
            let entry = Self::default().str(1, key).str(2, value);
            self.message(field, &entry)
        }

        /// A list: its `ListMeta` (VERSION and `continue_token`), then ITEMS.
        pub(crate) fn list(items: &[Self], version: &str, continue_token: &str) -> Self {
            let meta = Self::default().str(2, version).str(3, continue_token);
            items
                .iter()
                .fold(Self::default().message(1, &meta), |list, item| {
                    list.message(2, item)
                })
        }

        /// MESSAGE in the API server's envelope, named KIND.
        pub(crate) fn enveloped(&self, api_version: &str, kind: &str) -> Vec<u8> {
            let type_meta = Self::default().str(1, api_version).str(2, kind);
            let unknown = Self::default()
                .message(1, &type_meta)
                .bytes(2, &self.0)
                .str(3, "")
                .str(4, "");
            [&super::MAGIC[..], &unknown.0].concat()
        }
    }
}
