//! floorguard's hot path, compiled: `parse`'s common case and `decide_batch`'s common records, over
//! the Python core's own types and state; and the Kafka record batches the worker reads (`fetch`)
//! and those a publish sends (`produce`). `worker/core/native.py` builds the one `Core` and says
//! when it is used; the Python core stays the definition, and decides whatever is not common.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

mod batch;
mod decide;
mod fetch;
mod json;
mod parse;
mod produce;
mod rows;
mod time;

pub const SAFE_INTEGER_MAX: i64 = (1 << 53) - 1;

/// The ops, in `worker.core.codes.Op`'s order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    Open,
    Credit,
    Charge,
    Reserve,
    Extend,
    Capture,
    Release,
    Expire,
}

const OPS: [Op; 8] = [Op::Open, Op::Credit, Op::Charge, Op::Reserve, Op::Extend, Op::Capture, Op::Release, Op::Expire];

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Credit => "credit",
            Op::Charge => "charge",
            Op::Reserve => "reserve",
            Op::Extend => "extend",
            Op::Capture => "capture",
            Op::Release => "release",
            Op::Expire => "expire",
        }
    }

    pub fn named(name: &str) -> Option<Op> {
        OPS.iter().copied().find(|op| op.name() == name)
    }

    /// `worker.core.parse.OP_FIELDS`: which of amount, usage, floor, hold and ttl_ms the op takes,
    /// and which it requires.
    pub fn fields(self) -> ([bool; 5], [bool; 5]) {
        const NO: bool = false;
        const YES: bool = true;
        match self {
            Op::Open => ([NO, NO, YES, NO, NO], [NO; 5]),
            Op::Credit => ([YES, NO, NO, NO, NO], [YES, NO, NO, NO, NO]),
            Op::Charge => ([YES, YES, NO, NO, NO], [NO; 5]),
            Op::Reserve => ([YES, YES, NO, NO, YES], [NO; 5]),
            Op::Extend => ([YES, NO, NO, YES, YES], [YES, NO, NO, YES, NO]),
            Op::Capture => ([YES, YES, NO, YES, NO], [NO, NO, NO, YES, NO]),
            Op::Release | Op::Expire => ([NO, NO, NO, YES, NO], [NO, NO, NO, YES, NO]),
        }
    }
}

/// The fields of the core's types that the compiled path makes or reads, in their order.
const KNOWN_FIELDS: [(&str, &[&str]); 8] = [
    ("Command", &["op", "id", "wallet", "amount", "usage", "floor", "hold", "ttl_ms", "memo", "v"]),
    ("Usage", &["model", "input_tokens", "output_tokens"]),
    ("ReplyAddress", &["topic", "correlation_id", "partition"]),
    ("Parsed", &["record", "command", "reply_address", "dead_letter_reason", "credentials"]),
    ("Wallet", &["wallet", "balance", "reserved", "floor", "seq", "partition"]),
    ("Hold", &["wallet", "hold", "amount", "expires_at_ms", "open", "partition"]),
    ("Decision", &["parsed", "reply", "stored", "wallet", "hold", "fingerprint", "memo", "at_ms"]),
    ("StoredDecision", &["fingerprint", "reply"]),
];

/// The Python core's types and functions that the compiled path makes and calls.
#[pyclass(frozen)]
pub struct Core {
    command: Py<PyAny>,
    usage: Py<PyAny>,
    reply_address: Py<PyAny>,
    parsed: Py<PyAny>,
    wallet: Py<PyAny>,
    hold: Py<PyAny>,
    decision: Py<PyAny>,
    stored_decision: Py<PyAny>,
    ops: Vec<Py<PyAny>>,       // the Op members, in OPS' order
    op_names: Vec<Py<PyString>>, // their values
    credentials: Py<PyAny>,
    parse: Py<PyAny>,
    decide: Py<PyAny>,
}

impl Core {
    fn op_member<'py>(&self, py: Python<'py>, op: Op) -> &Bound<'py, PyAny> {
        self.ops[op as usize].bind(py)
    }

    fn op_name<'py>(&self, py: Python<'py>, op: Op) -> &Bound<'py, PyString> {
        self.op_names[op as usize].bind(py)
    }

    fn op_of(&self, member: &Bound<'_, PyAny>) -> Option<Op> {
        OPS.iter().copied().find(|&op| self.ops[op as usize].bind(member.py()).is(member))
    }
}

#[pymethods]
impl Core {
    /// `parts` names the Python core's pieces: the types Command, Usage, ReplyAddress, Parsed,
    /// Wallet, Hold, Decision, StoredDecision and Op, and the functions credentials, parse and
    /// decide (the Python core's, for whatever is not the common case).
    #[new]
    fn new(parts: &Bound<'_, PyDict>) -> PyResult<Self> {
        let py = parts.py();
        let part = |name: &str| -> PyResult<Py<PyAny>> {
            parts
                .get_item(name)?
                .map(Bound::unbind)
                .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_owned()))
        };
        // The compiled path makes these types positionally and reads them by name: a field added,
        // removed or moved in worker/core/model.py must be taught to it (or handed to the Python
        // core) before the worker starts, never read silently wrong.
        for (name, fields) in KNOWN_FIELDS {
            let found: Vec<String> = part(name)?.bind(py).getattr("__struct_fields__")?.extract()?;
            if found != fields {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "floorguard_native knows {name}'s fields as {fields:?}, the core has {found:?}: update native/src"
                )));
            }
        }
        let op_type = part("Op")?;
        let mut ops = Vec::new();
        let mut op_names = Vec::new();
        for op in OPS {
            let member = op_type.bind(py).call1((op.name(),))?;
            ops.push(member.unbind());
            op_names.push(PyString::intern(py, op.name()).unbind());
        }
        Ok(Core {
            command: part("Command")?,
            usage: part("Usage")?,
            reply_address: part("ReplyAddress")?,
            parsed: part("Parsed")?,
            wallet: part("Wallet")?,
            hold: part("Hold")?,
            decision: part("Decision")?,
            stored_decision: part("StoredDecision")?,
            ops,
            op_names,
            credentials: part("credentials")?,
            parse: part("parse")?,
            decide: part("decide")?,
        })
    }

    /// `worker.core.parse.parse(record, forbidden, partitions)`: the same `Parsed`.
    #[pyo3(signature = (record, forbidden, partitions=None))]
    fn parse<'py>(
        &self,
        record: &Bound<'py, PyAny>,
        forbidden: &Bound<'py, PyAny>,
        partitions: Option<u32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match parse::well_formed(self, record, forbidden, partitions)? {
            Some(parsed) => Ok(parsed),
            None => self.parse.bind(record.py()).call1((record, forbidden, partitions)),
        }
    }

    /// The common case alone: the `Parsed`, or None where the Python core must read the record.
    #[pyo3(signature = (record, forbidden, partitions=None))]
    fn well_formed<'py>(
        &self,
        record: &Bound<'py, PyAny>,
        forbidden: &Bound<'py, PyAny>,
        partitions: Option<u32>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        parse::well_formed(self, record, forbidden, partitions)
    }

    /// `worker.core.decide.decide_batch(state, batch)`: the same decisions and the same state after.
    fn decide_batch<'py>(
        &self,
        state: &Bound<'py, PyAny>,
        batch: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, pyo3::types::PyList>> {
        decide::decide_batch(self, state, batch)
    }

    /// `worker.store.rows.decision_columns(stored, replies)`: the same fifteen columns.
    #[staticmethod]
    fn decision_columns<'py>(
        stored: &Bound<'py, PyAny>,
        replies: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
        rows::decision_columns(stored, replies)
    }

    /// `worker.core.decide.format_time` for 1970 to 9999.
    #[staticmethod]
    fn format_time(at_ms: i64) -> PyResult<String> {
        if (0..=time::FORMATTED_MAX_MS).contains(&at_ms) {
            Ok(time::format_time(at_ms))
        } else {
            Err(pyo3::exceptions::PyValueError::new_err("outside 1970 to 9999"))
        }
    }

    /// Kafka's default partitioner, as `worker.core.placement.partition_of`.
    #[staticmethod]
    fn partition_of(key: &[u8], partitions: u32) -> u32 {
        parse::partition_of(key, partitions)
    }
}

#[pymodule]
fn floorguard_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Core>()?;
    module.add_function(wrap_pyfunction!(fetch::read_records, module)?)?;
    module.add_function(wrap_pyfunction!(produce::record_batch, module)?)?;
    module.add_function(wrap_pyfunction!(produce::finish, module)?)?;
    Ok(())
}
