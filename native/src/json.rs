//! A strict reader for the one JSON shape a well-formed command has: an object of known keys whose
//! values are plain strings, plain integers, or (for `usage`) an object of the same kind.
//!
//! It answers `None` whenever anything is unusual (an escape, a null, a fraction, a repeated key,
//! an unknown key, a control character, bytes that are not UTF-8), and the Python core then reads
//! the record its own way. Being stricter than the Python fast path costs speed on rare records,
//! never a different answer.

/// An integer of more digits than this is left to the Python core (2^53 has 16).
const DIGITS_MAX: usize = 18;

pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Object,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn skip_space(&mut self) {
        while let Some(&b) = self.bytes.get(self.at) {
            if b == b' ' || b == b'\t' || b == b'\n' || b == b'\r' {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    /// Consumes `byte` after any whitespace; false (nothing consumed past the space) otherwise.
    pub fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        if self.bytes.get(self.at) == Some(&byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// Whether only whitespace is left.
    pub fn at_end(&mut self) -> bool {
        self.skip_space();
        self.at == self.bytes.len()
    }

    /// A string without escapes or control characters, as UTF-8.
    pub fn string(&mut self) -> Option<&'a str> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        loop {
            let b = *self.bytes.get(self.at)?;
            if b == b'"' {
                break;
            }
            if b == b'\\' || b < 0x20 {
                return None;
            }
            self.at += 1;
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).ok()?;
        self.at += 1;
        Some(text)
    }

    /// A plain integer: an optional minus, no leading zero, no fraction or exponent.
    pub fn integer(&mut self) -> Option<i64> {
        self.skip_space();
        let negative = self.bytes.get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let start = self.at;
        while let Some(b) = self.bytes.get(self.at) {
            if b.is_ascii_digit() {
                self.at += 1;
            } else {
                break;
            }
        }
        let digits = &self.bytes[start..self.at];
        if digits.is_empty() || digits.len() > DIGITS_MAX || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            return None;
        }
        let mut value: i64 = 0;
        for &d in digits {
            value = value * 10 + i64::from(d - b'0');
        }
        Some(if negative { -value } else { value })
    }

    /// The next value: a string, an integer, or the start of an object (its `{` consumed).
    pub fn value(&mut self) -> Option<Value<'a>> {
        self.skip_space();
        match self.bytes.get(self.at)? {
            b'"' => self.string().map(Value::Str),
            b'{' => {
                self.at += 1;
                Some(Value::Object)
            }
            b'-' | b'0'..=b'9' => self.integer().map(Value::Int),
            _ => None,
        }
    }
}
