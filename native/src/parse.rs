//! The common case of `worker.core.parse.parse`, compiled: a well-formed command with a usable (or
//! no) reply address becomes the same `Parsed` the Python core makes. Whatever is unusual is read
//! by the Python core instead (`Fields::read` and `well_formed` answer `None`), so the 422s and
//! their wording stay the Python core's alone.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::json::{Reader, Value};
use crate::{Core, Op, SAFE_INTEGER_MAX};

const VALUE_SIZE_MAX_BYTES: usize = 16 * 1024;
const MEMO_LENGTH_MAX_CHARS: usize = 256;
const CORRELATION_ID_SIZE_MAX_BYTES: usize = 255;
const MODEL_LENGTH_MAX_CHARS: usize = 128;
const TOPIC_NAME_LENGTH_MAX_CHARS: usize = 249;
const TTL_MAX_MS: i64 = 86_400_000;
const ID_LENGTH_MAX_CHARS: usize = 128;

/// A command's fields as read from its JSON, before the checks that types cannot make.
#[derive(Default)]
pub struct Fields<'a> {
    pub v: Option<i64>,
    pub op: Option<Op>,
    pub id: Option<&'a str>,
    pub wallet: Option<&'a str>,
    pub amount: Option<i64>,
    pub usage: Option<(&'a str, i64, i64)>,
    pub floor: Option<i64>,
    pub hold: Option<&'a str>,
    pub ttl_ms: Option<i64>,
    pub memo: Option<&'a str>,
}

fn set<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None; // a key given twice
    }
    *slot = Some(value?);
    Some(())
}

fn int(value: Value<'_>) -> Option<i64> {
    match value {
        Value::Int(n) => Some(n),
        _ => None,
    }
}

fn text(value: Value<'_>) -> Option<&str> {
    match value {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

impl<'a> Fields<'a> {
    pub fn read(bytes: &'a [u8]) -> Option<Fields<'a>> {
        let mut reader = Reader::new(bytes);
        let mut fields = Fields::default();
        if !reader.eat(b'{') {
            return None;
        }
        if !reader.eat(b'}') {
            members(&mut reader, |reader, key, value| match key {
                "v" => set(&mut fields.v, int(value)),
                "op" => set(&mut fields.op, text(value).and_then(Op::named)),
                "id" => set(&mut fields.id, text(value)),
                "wallet" => set(&mut fields.wallet, text(value)),
                "amount" => set(&mut fields.amount, int(value)),
                "floor" => set(&mut fields.floor, int(value)),
                "hold" => set(&mut fields.hold, text(value)),
                "ttl_ms" => set(&mut fields.ttl_ms, int(value)),
                "memo" => set(&mut fields.memo, text(value)),
                "usage" => match value {
                    Value::Object => set(&mut fields.usage, read_usage(reader)),
                    _ => None,
                },
                _ => None,
            })?;
        }
        if reader.at_end() {
            Some(fields)
        } else {
            None
        }
    }
}

/// Each `"key": value` of an object whose `{` is consumed, through `take`, up to its `}`.
fn members<'a>(
    reader: &mut Reader<'a>,
    mut take: impl FnMut(&mut Reader<'a>, &'a str, Value<'a>) -> Option<()>,
) -> Option<()> {
    loop {
        let key = reader.string()?;
        if !reader.eat(b':') {
            return None;
        }
        let value = reader.value()?;
        take(reader, key, value)?;
        if reader.eat(b'}') {
            return Some(());
        }
        if !reader.eat(b',') {
            return None;
        }
    }
}

/// `usage`'s members, its `{` consumed: all three, once each, nothing else.
fn read_usage<'a>(reader: &mut Reader<'a>) -> Option<(&'a str, i64, i64)> {
    let (mut model, mut input, mut output) = (None, None, None);
    members(reader, |_, key, value| match key {
        "model" => set(&mut model, text(value)),
        "input_tokens" => set(&mut input, int(value)),
        "output_tokens" => set(&mut output, int(value)),
        _ => None,
    })?;
    Some((model?, input?, output?))
}

/// The contract's id pattern, `[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}`.
pub fn good_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= ID_LENGTH_MAX_CHARS
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// A legal topic name, `[A-Za-z0-9._-]{1,249}`.
fn good_topic(topic: &[u8]) -> bool {
    !topic.is_empty()
        && topic.len() <= TOPIC_NAME_LENGTH_MAX_CHARS
        && topic.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Kafka's murmur2, as `worker.core.placement.murmur2`.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5BD1_E995;
    let length = data.len();
    let mut h: u32 = 0x9747_B28C ^ (length as u32);
    let whole = length & !3;
    for chunk in data[..whole].chunks_exact(4) {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]).wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = length & 3;
    if rest == 3 {
        h ^= u32::from(data[whole + 2]) << 16;
    }
    if rest >= 2 {
        h ^= u32::from(data[whole + 1]) << 8;
    }
    if rest >= 1 {
        h ^= u32::from(data[whole]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7FFF_FFFF) % partitions
}

fn printable_ascii(text: &str) -> bool {
    text.bytes().all(|b| (0x20..0x7F).contains(&b))
}

/// What the record says, as long as it is the common case; `None` otherwise.
pub fn well_formed<'py>(
    core: &Core,
    record: &Bound<'py, PyAny>,
    forbidden: &Bound<'py, PyAny>,
    partitions: Option<u32>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = record.py();
    let value = record.getattr(intern!(py, "value"))?;
    let value = match value.downcast::<PyBytes>().ok() { Some(v) => v, None => return Ok(None) };
    let bytes = value.as_bytes();
    if bytes.len() > VALUE_SIZE_MAX_BYTES || bytes.contains(&b'\\') {
        return Ok(None);
    }
    let mut reply_to: Option<Bound<'py, PyBytes>> = None;
    let mut correlation: Option<Bound<'py, PyBytes>> = None;
    let mut signed = false;
    let headers = record.getattr(intern!(py, "headers"))?;
    let headers = match headers.downcast::<PyTuple>().ok() { Some(v) => v, None => return Ok(None) };
    for header in headers.iter() {
        let pair = match header.downcast::<PyTuple>().ok() { Some(v) => v, None => return Ok(None) };
        if pair.len() != 2 {
            return Ok(None);
        }
        let name = pair.get_item(0)?;
        let name = match name.extract::<&str>().ok() { Some(v) => v, None => return Ok(None) };
        match name {
            "reply_to" => {
                if reply_to.is_some() {
                    return Ok(None);
                }
                let raw = match pair.get_item(1)?.downcast_into::<PyBytes>().ok() { Some(v) => v, None => return Ok(None) };
                reply_to = Some(raw);
            }
            "correlation_id" => {
                if correlation.is_some() {
                    return Ok(None);
                }
                let raw = match pair.get_item(1)?.downcast_into::<PyBytes>().ok() { Some(v) => v, None => return Ok(None) };
                if raw.as_bytes().len() > CORRELATION_ID_SIZE_MAX_BYTES {
                    return Ok(None);
                }
                correlation = Some(raw);
            }
            "reply_partition" => return Ok(None),
            "auth" => signed = true,
            _ => {}
        }
    }
    let fields = match Fields::read(bytes) { Some(v) => v, None => return Ok(None) };
    let (op, id, wallet) = match (fields.op, fields.id, fields.wallet) {
        (Some(op), Some(id), Some(wallet)) => (op, id, wallet),
        _ => return Ok(None),
    };
    if fields.v != Some(1) || !good_id(id) || !good_id(wallet) {
        return Ok(None);
    }
    let key = record.getattr(intern!(py, "key"))?;
    let key = match key.downcast::<PyBytes>().ok() { Some(v) => v, None => return Ok(None) };
    if key.as_bytes() != wallet.as_bytes() {
        return Ok(None);
    }
    if let Some(count) = partitions {
        let partition: i64 = record.getattr(intern!(py, "partition"))?.extract()?;
        if count == 0 || i64::from(partition_of(key.as_bytes(), count)) != partition {
            return Ok(None);
        }
    }
    // The optional fields this op takes (amount, usage, floor, hold, ttl_ms), and those it requires.
    let (takes, requires) = op.fields();
    let given = [
        fields.amount.is_some(),
        fields.usage.is_some(),
        fields.floor.is_some(),
        fields.hold.is_some(),
        fields.ttl_ms.is_some(),
    ];
    for (i, &present) in given.iter().enumerate() {
        if (present && !takes[i]) || (!present && requires[i]) {
            return Ok(None);
        }
    }
    // JSON strings, as the Python fast path counts them: the keys v, op, id and wallet and the
    // values of op, id and wallet, then each optional field's key and, for hold and memo, its value.
    let mut strings = 7;
    if let Some(amount) = fields.amount {
        strings += 1;
        let least = if op == Op::Capture { 0 } else { 1 };
        if !(least..=SAFE_INTEGER_MAX).contains(&amount) || fields.usage.is_some() {
            return Ok(None);
        }
    } else if fields.usage.is_none() && matches!(op, Op::Charge | Op::Reserve) {
        return Ok(None);
    }
    if let Some((model, input, output)) = fields.usage {
        strings += 5;
        if model.is_empty()
            || model.len() > MODEL_LENGTH_MAX_CHARS
            || !printable_ascii(model)
            || !(0..=SAFE_INTEGER_MAX).contains(&input)
            || !(0..=SAFE_INTEGER_MAX).contains(&output)
        {
            return Ok(None);
        }
    }
    if let Some(floor) = fields.floor {
        strings += 1;
        if !(-SAFE_INTEGER_MAX..=0).contains(&floor) {
            return Ok(None);
        }
    }
    if let Some(hold) = fields.hold {
        strings += 2;
        if !good_id(hold) {
            return Ok(None);
        }
    }
    if let Some(ttl_ms) = fields.ttl_ms {
        strings += 1;
        if !(1..=TTL_MAX_MS).contains(&ttl_ms) {
            return Ok(None);
        }
    }
    if let Some(memo) = fields.memo {
        strings += 2;
        if memo.chars().count() > MEMO_LENGTH_MAX_CHARS || memo.contains('\0') {
            return Ok(None);
        }
    }
    if op == Op::Expire {
        let hold = fields.hold.unwrap_or("");
        if id.len() != 7 + hold.len() || !id.starts_with("expire:") || &id[7..] != hold {
            return Ok(None);
        }
    } else if id.starts_with("expire:") {
        return Ok(None);
    }
    if bytes.iter().filter(|&&b| b == b'"').count() != 2 * strings {
        return Ok(None);
    }
    let address = match reply_to {
        None => py.None().into_bound(py),
        Some(raw) => {
            let topic = raw.as_bytes();
            if !good_topic(topic) || topic == b"." || topic == b".." {
                return Ok(None);
            }
            let topic = std::str::from_utf8(topic).expect("a good topic is ASCII");
            if forbidden.contains(topic)? {
                return Ok(None);
            }
            let correlation_id = match &correlation {
                None => "",
                Some(raw) => match std::str::from_utf8(raw.as_bytes()) {
                    Ok(text) => text,
                    Err(_) => return Ok(None),
                },
            };
            core.reply_address.bind(py).call1((topic, correlation_id, py.None()))?
        }
    };
    let usage = match fields.usage {
        None => py.None().into_bound(py),
        Some((model, input, output)) => core.usage.bind(py).call1((model, input, output))?,
    };
    let command = core.command.bind(py).call1((
        core.op_member(py, op),
        id,
        wallet,
        fields.amount,
        usage,
        fields.floor,
        fields.hold,
        fields.ttl_ms,
        fields.memo,
        1,
    ))?;
    let credentials = if signed {
        core.credentials.bind(py).call1((record,))?
    } else {
        intern!(py, "missing").clone().into_any()
    };
    Ok(Some(core.parsed.bind(py).call1((record, command, address, py.None(), credentials))?))
}
