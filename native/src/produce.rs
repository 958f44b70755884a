//! Kafka's record batch (message format v2, uncompressed), written in one call per topic partition
//! from the records a publish sends: what aiokafka's batch builder writes one `append` at a time.
//! `worker/adapter/publisher.py` hands the bytes to aiokafka's producer, which sets the producer's
//! id, epoch and sequence (`finish`) before it sends them.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString, PyTuple};

use crate::batch::*;

fn varint(value: i64, out: &mut Vec<u8>) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

fn varint_size(value: i64) -> usize {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let mut size = 1;
    while zigzag >= 0x80 {
        zigzag >>= 7;
        size += 1;
    }
    size
}

fn bytes_field(value: &Bound<'_, PyAny>, out: &mut Vec<u8>, what: &str) -> PyResult<()> {
    if value.is_none() {
        varint(-1, out);
        return Ok(());
    }
    let bytes = value
        .downcast::<PyBytes>()
        .map_err(|_| PyValueError::new_err(format!("a record's {what} is bytes or None")))?
        .as_bytes();
    varint(bytes.len() as i64, out);
    out.extend_from_slice(bytes);
    Ok(())
}

/// One record's body (attributes to headers), as aiokafka writes it: every record of the batch
/// has the batch's timestamp, so its timestamp delta is 0.
fn record_body(record: &Bound<'_, PyAny>, offset_delta: i64, body: &mut Vec<u8>) -> PyResult<()> {
    body.clear();
    body.push(0); // attributes
    varint(0, body); // timestamp delta
    varint(offset_delta, body);
    let py = record.py();
    bytes_field(&record.getattr(pyo3::intern!(py, "key"))?, body, "key")?;
    bytes_field(&record.getattr(pyo3::intern!(py, "value"))?, body, "value")?;
    let headers = record.getattr(pyo3::intern!(py, "headers"))?;
    let headers = headers
        .downcast::<PyTuple>()
        .map_err(|_| PyValueError::new_err("a record's headers are a tuple of (str, bytes) pairs"))?;
    varint(headers.len() as i64, body);
    for header in headers.iter() {
        let (name, value): (Bound<'_, PyString>, Bound<'_, PyAny>) = header.extract()?;
        let name = name.to_str()?;
        varint(name.len() as i64, body);
        body.extend_from_slice(name.as_bytes());
        bytes_field(&value, body, "header value")?;
    }
    Ok(())
}

/// The records of `records` from `start` on (each with `key`, `value` and `headers`, as
/// `worker.core.outgoing.Outgoing`), as one batch stamped `timestamp_ms`, of at most `size_max`
/// bytes (the first record is taken whatever its size, as aiokafka does); the batch and the index
/// of the first record left out. Its producer fields are aiokafka's before it sets them (id and
/// epoch -1, sequence 0) and its CRC is not written yet: see `finish`.
#[pyfunction]
pub fn record_batch<'py>(
    py: Python<'py>,
    records: &Bound<'py, PyList>,
    start: usize,
    timestamp_ms: i64,
    size_max: usize,
) -> PyResult<(Bound<'py, PyByteArray>, usize)> {
    let mut out = Vec::with_capacity(size_max.min(1 << 20));
    out.resize(HEADER_BYTES, 0);
    let mut body = Vec::with_capacity(1024);
    let mut end = start;
    while end < records.len() {
        let delta = (end - start) as i64;
        record_body(&records.get_item(end)?, delta, &mut body)?;
        let needed = varint_size(body.len() as i64) + body.len();
        if end > start && out.len() + needed > size_max {
            break;
        }
        varint(body.len() as i64, &mut out);
        out.extend_from_slice(&body);
        end += 1;
    }
    if end == start {
        return Err(PyValueError::new_err("no record to put in a batch"));
    }
    let count = (end - start) as i32;
    let length = (out.len() - LENGTH_AT - 4) as i32;
    out[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&length.to_be_bytes());
    out[LENGTH_AT + 4..MAGIC_AT].copy_from_slice(&NO_PARTITION_LEADER_EPOCH.to_be_bytes());
    out[MAGIC_AT] = MAGIC;
    out[LAST_OFFSET_DELTA_AT..FIRST_TIMESTAMP_AT].copy_from_slice(&(count - 1).to_be_bytes());
    out[FIRST_TIMESTAMP_AT..MAX_TIMESTAMP_AT].copy_from_slice(&timestamp_ms.to_be_bytes());
    out[MAX_TIMESTAMP_AT..PRODUCER_ID_AT].copy_from_slice(&timestamp_ms.to_be_bytes());
    write_producer(&mut out, -1, -1, 0);
    out[COUNT_AT..HEADER_BYTES].copy_from_slice(&count.to_be_bytes());
    Ok((PyByteArray::new(py, &out), end))
}

fn write_producer(out: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) {
    out[PRODUCER_ID_AT..PRODUCER_EPOCH_AT].copy_from_slice(&producer_id.to_be_bytes());
    out[PRODUCER_EPOCH_AT..BASE_SEQUENCE_AT].copy_from_slice(&producer_epoch.to_be_bytes());
    out[BASE_SEQUENCE_AT..COUNT_AT].copy_from_slice(&base_sequence.to_be_bytes());
}

/// Sets a batch's producer fields (as aiokafka's `set_producer_state`) and writes its CRC, in place.
#[pyfunction]
pub fn finish(batch: &Bound<'_, PyByteArray>, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> PyResult<()> {
    // SAFETY: the GIL is held and nothing else runs while this borrow lives; the bytearray is not resized.
    let data = unsafe { batch.as_bytes_mut() };
    if data.len() < HEADER_BYTES || data[MAGIC_AT] != MAGIC {
        return Err(PyValueError::new_err("not a record batch of message format v2"));
    }
    write_producer(data, producer_id, producer_epoch, base_sequence);
    let crc = crc32c(&data[ATTRIBUTES_AT..]);
    data[CRC_AT..ATTRIBUTES_AT].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}
