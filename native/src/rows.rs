//! `worker.store.rows.decision_columns`, compiled: a batch's stored decisions as the fifteen columns
//! `floorguard_commit` takes, each built in one string rather than a Python string per value.

use pyo3::exceptions::PyKeyError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use std::fmt::Write;

/// A text[] literal: each value quoted (ids, wallets, ops and fingerprints need no escaping).
struct Words(String);
/// A bigint[] literal; with NULLs, the nullable columns' too.
struct Numbers(String);

impl Words {
    fn new() -> Self {
        Words(String::from("{"))
    }
    fn push(&mut self, value: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push('"');
        self.0.push_str(value);
        self.0.push('"');
    }
    fn done(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

impl Numbers {
    fn new() -> Self {
        Numbers(String::from("{"))
    }
    fn separate(&mut self) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
    }
    fn push(&mut self, value: i64) {
        self.separate();
        let _ = write!(self.0, "{value}");
    }
    /// None as NULL, an integer as itself, a word (an error code) as it is.
    fn push_nullable(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.separate();
        if value.is_none() {
            self.0.push_str("NULL");
        } else if let Ok(word) = value.downcast::<PyString>() {
            self.0.push_str(word.to_str()?);
        } else {
            let number: i64 = value.extract()?;
            let _ = write!(self.0, "{number}");
        }
        Ok(())
    }
    fn done(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn item<'py>(reply: &Bound<'py, PyDict>, key: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyAny>> {
    reply.get_item(key)?.ok_or_else(|| PyKeyError::new_err(key.clone().unbind()))
}

pub fn decision_columns<'py>(stored: &Bound<'py, PyAny>, replies: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
    let py = stored.py();
    let (mut wallets, mut ids, mut ops, mut fingerprints) = (Words::new(), Words::new(), Words::new(), Words::new());
    let (mut seqs, mut statuses, mut errors, mut amounts) = (Numbers::new(), Numbers::new(), Numbers::new(), Numbers::new());
    let (mut balances, mut reserveds, mut times) = (Numbers::new(), Numbers::new(), Numbers::new());
    let (mut partitions, mut offsets) = (Numbers::new(), Numbers::new());
    let memos = PyList::empty(py);
    for decision in stored.try_iter()? {
        let decision = decision?;
        let reply = decision.getattr(intern!(py, "reply"))?.downcast_into::<PyDict>()?;
        let wallet = decision.getattr(intern!(py, "wallet"))?;
        let record = decision.getattr(intern!(py, "parsed"))?.getattr(intern!(py, "record"))?;
        ids.push(item(&reply, intern!(py, "id"))?.downcast::<PyString>()?.to_str()?);
        wallets.push(item(&reply, intern!(py, "wallet"))?.downcast::<PyString>()?.to_str()?);
        ops.push(item(&reply, intern!(py, "op"))?.downcast::<PyString>()?.to_str()?);
        fingerprints.push(decision.getattr(intern!(py, "fingerprint"))?.downcast::<PyString>()?.to_str()?);
        seqs.push(item(&reply, intern!(py, "seq"))?.extract()?);
        statuses.push(item(&reply, intern!(py, "status"))?.extract()?);
        errors.push_nullable(&item(&reply, intern!(py, "error"))?)?;
        match reply.get_item(intern!(py, "amount"))? {
            Some(amount) => amounts.push_nullable(&amount)?,
            None => amounts.push_nullable(&py.None().into_bound(py))?,
        }
        balances.push(wallet.getattr(intern!(py, "balance"))?.extract()?);
        reserveds.push(wallet.getattr(intern!(py, "reserved"))?.extract()?);
        times.push(decision.getattr(intern!(py, "at_ms"))?.extract()?);
        memos.append(decision.getattr(intern!(py, "memo"))?)?;
        partitions.push(record.getattr(intern!(py, "partition"))?.extract()?);
        offsets.push(record.getattr(intern!(py, "offset"))?.extract()?);
    }
    let texts = PyList::empty(py);
    for encoded in replies.try_iter()? {
        let encoded = encoded?;
        let bytes = encoded.downcast::<PyBytes>()?.as_bytes();
        let text = std::str::from_utf8(bytes).map_err(|error| pyo3::exceptions::PyValueError::new_err(error.to_string()))?;
        texts.append(PyString::new(py, text))?;
    }
    PyTuple::new(
        py,
        [
            wallets.done().into_pyobject(py)?.into_any(),
            ids.done().into_pyobject(py)?.into_any(),
            seqs.done().into_pyobject(py)?.into_any(),
            ops.done().into_pyobject(py)?.into_any(),
            statuses.done().into_pyobject(py)?.into_any(),
            errors.done().into_pyobject(py)?.into_any(),
            amounts.done().into_pyobject(py)?.into_any(),
            balances.done().into_pyobject(py)?.into_any(),
            reserveds.done().into_pyobject(py)?.into_any(),
            times.done().into_pyobject(py)?.into_any(),
            fingerprints.done().into_pyobject(py)?.into_any(),
            memos.into_any(),
            partitions.done().into_pyobject(py)?.into_any(),
            offsets.done().into_pyobject(py)?.into_any(),
            texts.into_any(),
        ],
    )
}
