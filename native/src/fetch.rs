//! A fetched partition's bytes (Kafka's record batches, message format v2) read into the core's
//! `Record`s in one call: what aiokafka's reader and the worker's `fetch_guard.as_record` make of
//! them one record at a time. Only the common case: a fetch with a batch that is compressed,
//! transactional, a control batch, of another format, with a bad CRC, or with a header name that
//! is not UTF-8 is left to aiokafka (`None`), which reads, skips or refuses it as it always has.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::batch::*;

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<i64> {
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let byte = *self.data.get(self.at)?;
            self.at += 1;
            value |= ((byte & 0x7F) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
    }

    fn bytes(&mut self) -> Option<Option<&'a [u8]>> {
        let length = self.varint()?;
        if length < 0 {
            return Some(None);
        }
        let end = self.at.checked_add(length as usize)?;
        let found = self.data.get(self.at..end)?;
        self.at = end;
        Some(Some(found))
    }
}

fn be_i64(data: &[u8], at: usize) -> i64 {
    i64::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3], data[at + 4], data[at + 5], data[at + 6], data[at + 7]])
}

fn be_i32(data: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

/// The records of `data` at or past `fetch_offset` (and past the batches before them), as
/// `record_class(partition, offset, timestamp_ms, key, value, headers)`, and the offset after the
/// last whole batch; `None` when the fetch holds anything but the common case (see the module). A
/// batch cut short at the end of the fetch is left for the next fetch, as aiokafka leaves it.
#[pyfunction]
pub fn read_records<'py>(
    py: Python<'py>,
    data: &[u8],
    partition: i32,
    fetch_offset: i64,
    check_crcs: bool,
    record_class: &Bound<'py, PyAny>,
) -> PyResult<Option<(Bound<'py, PyList>, i64)>> {
    let out = PyList::empty(py);
    let mut at = 0;
    let mut next_offset = None;
    let mut position = fetch_offset; // as aiokafka's: past each batch, the batch's next offset
    while at + HEADER_BYTES <= data.len() {
        let length = be_i32(data, at + LENGTH_AT);
        if length < (HEADER_BYTES - LENGTH_AT - 4) as i32 {
            return Ok(None);
        }
        let end = at + LENGTH_AT + 4 + length as usize;
        if end > data.len() {
            break;
        }
        let batch = &data[at..end];
        let attributes = i16::from_be_bytes([batch[ATTRIBUTES_AT], batch[ATTRIBUTES_AT + 1]]);
        if batch[MAGIC_AT] != MAGIC || attributes & (COMPRESSION_MASK | TRANSACTIONAL | CONTROL) != 0 {
            return Ok(None);
        }
        if check_crcs && crc32c(&batch[ATTRIBUTES_AT..]) != be_i32(batch, CRC_AT) as u32 {
            return Ok(None);
        }
        let base_offset = be_i64(batch, 0);
        let last_offset_delta = be_i32(batch, LAST_OFFSET_DELTA_AT) as i64;
        let first_timestamp = be_i64(batch, FIRST_TIMESTAMP_AT);
        let max_timestamp = be_i64(batch, MAX_TIMESTAMP_AT);
        let count = be_i32(batch, COUNT_AT);
        let mut reader = Reader { data: batch, at: HEADER_BYTES };
        for _ in 0..count {
            match read_one(py, &mut reader, base_offset, first_timestamp, max_timestamp, attributes, partition, position, record_class)? {
                Read::Record(record) => out.append(record)?,
                Read::Before => {}
                Read::Unusual => return Ok(None),
            }
        }
        position = base_offset + last_offset_delta + 1;
        next_offset = Some(position);
        at = end;
    }
    Ok(next_offset.map(|offset| (out, offset)))
}

enum Read<'py> {
    Record(Bound<'py, PyAny>),
    Before, // below the fetch offset: a batch fetched from its start
    Unusual,
}

#[allow(clippy::too_many_arguments)]
fn read_one<'py>(
    py: Python<'py>,
    reader: &mut Reader<'_>,
    base_offset: i64,
    first_timestamp: i64,
    max_timestamp: i64,
    attributes: i16,
    partition: i32,
    fetch_offset: i64,
    record_class: &Bound<'py, PyAny>,
) -> PyResult<Read<'py>> {
    macro_rules! or_unusual {
        ($found:expr) => {
            match $found {
                Some(value) => value,
                None => return Ok(Read::Unusual),
            }
        };
    }
    let length = or_unusual!(reader.varint());
    if length < 0 {
        return Ok(Read::Unusual);
    }
    let end = or_unusual!(reader.at.checked_add(length as usize));
    if end > reader.data.len() {
        return Ok(Read::Unusual);
    }
    reader.at += 1; // the record's attributes (unused)
    let timestamp_delta = or_unusual!(reader.varint());
    let offset = base_offset + or_unusual!(reader.varint());
    let key = or_unusual!(reader.bytes());
    let value = or_unusual!(reader.bytes());
    let header_count = or_unusual!(reader.varint());
    if header_count < 0 {
        return Ok(Read::Unusual);
    }
    let mut headers = Vec::with_capacity(header_count as usize);
    for _ in 0..header_count {
        let name = or_unusual!(or_unusual!(reader.bytes()));
        let name = match std::str::from_utf8(name) {
            Ok(name) => name,
            Err(_) => return Ok(Read::Unusual), // read leniently by fetch_guard, as before
        };
        headers.push((name, or_unusual!(reader.bytes()).unwrap_or(b""))); // a null value reads as empty
    }
    if reader.at != end {
        return Ok(Read::Unusual);
    }
    if offset < fetch_offset {
        return Ok(Read::Before); // read through (a malformed record is unusual wherever it is), not made
    }
    let timestamp = if attributes & LOG_APPEND_TIME != 0 { max_timestamp } else { first_timestamp + timestamp_delta };
    let mut pairs = Vec::with_capacity(headers.len());
    for (name, header_value) in headers {
        pairs.push(PyTuple::new(py, [PyString::new(py, name).into_any(), PyBytes::new(py, header_value).into_any()])?);
    }
    let record = record_class.call1((
        partition,
        offset,
        timestamp,
        key.map(|key| PyBytes::new(py, key)),
        value.map(|value| PyBytes::new(py, value)),
        PyTuple::new(py, pairs)?,
    ))?;
    Ok(Read::Record(record))
}
