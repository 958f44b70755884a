//! `worker.core.decide.decide_batch`, compiled for the records that make up nearly every batch: a
//! well-formed command with no usage to price, on a partition where no signature is required, that
//! names a wallet the state holds (or opens one) under an id it has not decided. Every other
//! record (a 422, a 401 or 403, a 404, a duplicate, a priced usage, an expiry not yet due) is
//! decided by the Python core's own `decide`, on the same state objects, in the same order: the
//! two never disagree about what came first.
//!
//! The state is the Python core's `PartitionState`; what is written into it, and the `Decision`s
//! returned, are the very objects the Python core would make, field for field (a test holds the
//! two together on random histories).

use pyo3::exceptions::PyAssertionError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use sha2::{Digest, Sha256};

use crate::time::{format_time, FORMATTED_MAX_MS};
use crate::{Core, Op, SAFE_INTEGER_MAX};

const TTL_DEFAULT_MS: i64 = 300_000;
const STATUS_OK: i64 = 200;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Refusal {
    WalletExists,
    HoldNotFound,
    HoldClosed,
    HoldExpired,
    HoldNotExpired,
    ExceedsHold,
    InsufficientFunds,
    BalanceOverflow,
}

impl Refusal {
    fn code(self) -> &'static str {
        match self {
            Refusal::WalletExists => "wallet_exists",
            Refusal::HoldNotFound => "hold_not_found",
            Refusal::HoldClosed => "hold_closed",
            Refusal::HoldExpired => "hold_expired",
            Refusal::HoldNotExpired => "hold_not_expired",
            Refusal::ExceedsHold => "exceeds_hold",
            Refusal::InsufficientFunds => "insufficient_funds",
            Refusal::BalanceOverflow => "balance_overflow",
        }
    }

    fn status(self) -> i64 {
        match self {
            Refusal::WalletExists | Refusal::HoldClosed | Refusal::HoldNotExpired => 409,
            Refusal::ExceedsHold | Refusal::BalanceOverflow => 409,
            Refusal::HoldNotFound => 404,
            Refusal::HoldExpired => 410,
            Refusal::InsufficientFunds => 402,
        }
    }

    /// `worker.core.decide._MESSAGES`, word for word.
    fn message(self) -> &'static str {
        match self {
            Refusal::WalletExists => "the wallet already exists",
            Refusal::HoldNotFound => "no such hold in this wallet",
            Refusal::HoldClosed => "the hold was already captured, released or expired",
            Refusal::HoldExpired => "the hold expired",
            Refusal::HoldNotExpired => "the hold has not expired yet",
            Refusal::ExceedsHold => "the capture exceeds the hold",
            Refusal::InsufficientFunds => "the amount exceeds what is available",
            Refusal::BalanceOverflow => "the balance, a hold or available would pass 9007199254740991",
        }
    }
}

#[derive(Clone, Copy)]
struct Wallet {
    balance: i64,
    reserved: i64,
    floor: i64,
    seq: i64,
    partition: i64,
}

impl Wallet {
    fn available(&self) -> i64 {
        self.balance - self.reserved - self.floor
    }
}

#[derive(Clone, Copy)]
struct Hold {
    amount: i64,
    expires_at_ms: i64,
    open: bool,
    partition: i64,
}

/// An accepted command's result: the wallet after (its seq not yet moved), the hold after, the
/// amount, and when the hold now expires.
struct Effect {
    wallet: Wallet,
    hold: Option<Hold>,
    amount: i64,
    expires_at_ms: Option<i64>,
}

/// What a command asks, read from its `Command`.
struct Asked<'py> {
    op: Op,
    id: Bound<'py, PyAny>,
    wallet: Bound<'py, PyAny>,
    amount: Option<i64>,
    floor: Option<i64>,
    hold: Option<Bound<'py, PyAny>>,
    ttl_ms: Option<i64>,
    memo: Bound<'py, PyAny>,
}

fn read_wallet(object: &Bound<'_, PyAny>) -> PyResult<Wallet> {
    let py = object.py();
    Ok(Wallet {
        balance: object.getattr(intern!(py, "balance"))?.extract()?,
        reserved: object.getattr(intern!(py, "reserved"))?.extract()?,
        floor: object.getattr(intern!(py, "floor"))?.extract()?,
        seq: object.getattr(intern!(py, "seq"))?.extract()?,
        partition: object.getattr(intern!(py, "partition"))?.extract()?,
    })
}

fn read_hold(object: &Bound<'_, PyAny>) -> PyResult<Hold> {
    let py = object.py();
    Ok(Hold {
        amount: object.getattr(intern!(py, "amount"))?.extract()?,
        expires_at_ms: object.getattr(intern!(py, "expires_at_ms"))?.extract()?,
        open: object.getattr(intern!(py, "open"))?.extract()?,
        partition: object.getattr(intern!(py, "partition"))?.extract()?,
    })
}

/// `worker.core.decide._effect` and `_hold_effect`.
fn effect(
    asked: &Asked<'_>,
    wallet: Wallet,
    hold: Option<Hold>,
    at_ms: i64,
    partition: i64,
) -> PyResult<Result<Effect, Refusal>> {
    let amount = asked.amount;
    let done = |wallet: Wallet, hold: Option<Hold>, amount: i64, expires_at_ms: Option<i64>| {
        Ok(Ok(Effect { wallet, hold, amount, expires_at_ms }))
    };
    match asked.op {
        Op::Open => Ok(Err(Refusal::WalletExists)),
        Op::Credit => {
            let amount = amount.filter(|&a| a >= 1).ok_or_else(|| bug("a credit without an amount"))?;
            let balance = wallet.balance + amount;
            if balance > SAFE_INTEGER_MAX || balance - wallet.floor > SAFE_INTEGER_MAX {
                return Ok(Err(Refusal::BalanceOverflow));
            }
            done(Wallet { balance, ..wallet }, None, amount, None)
        }
        Op::Charge => {
            let amount = amount.filter(|&a| a >= 0).ok_or_else(|| bug("a charge without an amount"))?;
            if amount > wallet.available() {
                return Ok(Err(Refusal::InsufficientFunds));
            }
            done(Wallet { balance: wallet.balance - amount, ..wallet }, None, amount, None)
        }
        Op::Reserve => {
            let amount = amount.ok_or_else(|| bug("a reserve without an amount"))?;
            if amount > wallet.available() {
                return Ok(Err(Refusal::InsufficientFunds));
            }
            if wallet.reserved + amount > SAFE_INTEGER_MAX {
                return Ok(Err(Refusal::BalanceOverflow));
            }
            let expires_at_ms = at_ms + asked.ttl_ms.unwrap_or(TTL_DEFAULT_MS);
            let opened = Hold { amount, expires_at_ms, open: true, partition };
            done(Wallet { reserved: wallet.reserved + amount, ..wallet }, Some(opened), amount, Some(expires_at_ms))
        }
        Op::Extend | Op::Capture | Op::Release | Op::Expire => {
            let hold = match hold { Some(v) => v, None => return Ok(Err(Refusal::HoldNotFound)) };
            if !hold.open {
                return Ok(Err(Refusal::HoldClosed));
            }
            let expired = at_ms >= hold.expires_at_ms;
            let closed = Hold { open: false, ..hold };
            let released = Wallet { reserved: wallet.reserved - hold.amount, ..wallet };
            match asked.op {
                Op::Extend => {
                    let amount = amount.filter(|&a| a >= 1).ok_or_else(|| bug("an extend without an amount"))?;
                    if expired {
                        return Ok(Err(Refusal::HoldExpired));
                    }
                    if amount > wallet.available() {
                        return Ok(Err(Refusal::InsufficientFunds));
                    }
                    if hold.amount + amount > SAFE_INTEGER_MAX || wallet.reserved + amount > SAFE_INTEGER_MAX {
                        return Ok(Err(Refusal::BalanceOverflow));
                    }
                    let expires_at_ms = match asked.ttl_ms {
                        Some(ttl_ms) => at_ms + ttl_ms,
                        None => hold.expires_at_ms,
                    };
                    let grown = Hold { amount: hold.amount + amount, expires_at_ms, ..hold };
                    done(Wallet { reserved: wallet.reserved + amount, ..wallet }, Some(grown), amount, Some(expires_at_ms))
                }
                Op::Capture => {
                    if expired {
                        return Ok(Err(Refusal::HoldExpired));
                    }
                    let captured = amount.unwrap_or(hold.amount);
                    if captured > hold.amount {
                        return Ok(Err(Refusal::ExceedsHold));
                    }
                    done(Wallet { balance: wallet.balance - captured, ..released }, Some(closed), captured, None)
                }
                Op::Release => done(released, Some(closed), hold.amount, None),
                _ => {
                    if !expired {
                        return Ok(Err(Refusal::HoldNotExpired));
                    }
                    done(released, Some(closed), hold.amount, None)
                }
            }
        }
    }
}

fn bug(what: &str) -> PyErr {
    PyAssertionError::new_err(what.to_owned())
}

/// `worker.core.decide._assert_invariant`: a bug, not a refusal.
fn assert_invariant(wallet: &Wallet) -> PyResult<()> {
    let Wallet { balance, reserved, floor, .. } = *wallet;
    if balance - reserved >= floor
        && reserved >= 0
        && floor <= 0
        && (-SAFE_INTEGER_MAX..=SAFE_INTEGER_MAX).contains(&balance)
        && balance - reserved - floor <= SAFE_INTEGER_MAX
    {
        Ok(())
    } else {
        Err(bug(&format!(
            "invariant broken: balance {balance} reserved {reserved} floor {floor}"
        )))
    }
}

/// `Command.fingerprint` for a command without usage: sha256 of its request as canonical JSON.
fn fingerprint(asked: &Asked<'_>, id: &str, wallet: &str, hold: Option<&str>) -> String {
    use std::fmt::Write;
    let mut canonical = String::with_capacity(160);
    canonical.push('{');
    if let Some(amount) = asked.amount {
        let _ = write!(canonical, "\"amount\":{amount},");
    }
    if asked.op == Op::Open {
        let _ = write!(canonical, "\"floor\":{},", asked.floor.unwrap_or(0));
    }
    if let Some(hold) = hold {
        let _ = write!(canonical, "\"hold\":\"{hold}\",");
    }
    let _ = write!(canonical, "\"id\":\"{id}\",\"op\":\"{}\",", asked.op.name());
    if asked.op == Op::Reserve {
        let _ = write!(canonical, "\"ttl_ms\":{},", asked.ttl_ms.unwrap_or(TTL_DEFAULT_MS));
    } else if let Some(ttl_ms) = asked.ttl_ms {
        let _ = write!(canonical, "\"ttl_ms\":{ttl_ms},");
    }
    let _ = write!(canonical, "\"v\":1,\"wallet\":\"{wallet}\"}}");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(canonical.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 15)]));
    }
    hex
}

/// Decides one partition's batch in offset order, updating `state` as each record is decided.
pub fn decide_batch<'py>(
    core: &Core,
    state: &Bound<'py, PyAny>,
    batch: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let py = state.py();
    let wallets = state.getattr(intern!(py, "wallets"))?.downcast_into::<PyDict>()?;
    let stored_decisions = state.getattr(intern!(py, "decisions"))?.downcast_into::<PyDict>()?;
    let holds = state.getattr(intern!(py, "holds"))?.downcast_into::<PyDict>()?;
    let authority = state.getattr(intern!(py, "authority"))?;
    let partition: i64 = state.getattr(intern!(py, "partition"))?.extract()?;
    let mut clock_ms: i64 = state.getattr(intern!(py, "clock_ms"))?.extract()?;
    let mut formatted: Option<(i64, Bound<'py, PyString>)> = None;
    let decisions = PyList::empty(py);
    for parsed in batch.try_iter()? {
        let parsed = parsed?;
        let at_ms: i64 = parsed.getattr(intern!(py, "record"))?.getattr(intern!(py, "timestamp_ms"))?.extract()?;
        if at_ms > clock_ms {
            clock_ms = at_ms;
            state.setattr(intern!(py, "clock_ms"), clock_ms)?;
        }
        if authority.is_none() || !authority.call_method1(intern!(py, "required_at"), (clock_ms,))?.is_truthy()? {
            let context = Context { core, wallets: &wallets, stored_decisions: &stored_decisions, holds: &holds, partition };
            if let Some(decision) = decide(&context, &parsed, clock_ms, &mut formatted)? {
                decisions.append(decision)?;
                continue;
            }
        }
        let decision = core.decide.bind(py).call1((state, &parsed, clock_ms))?;
        if decision.getattr(intern!(py, "stored"))?.is_truthy()? {
            // As `decide_batch` does: the wallet after, the decision under its id, the hold after.
            let wallet = decision.getattr(intern!(py, "wallet"))?;
            let name = wallet.getattr(intern!(py, "wallet"))?;
            let reply = decision.getattr(intern!(py, "reply"))?;
            let id = reply.get_item(intern!(py, "id"))?;
            wallets.set_item(&name, &wallet)?;
            let earlier = core
                .stored_decision
                .bind(py)
                .call1((decision.getattr(intern!(py, "fingerprint"))?, reply))?;
            stored_decisions.set_item(PyTuple::new(py, [&name, &id])?, earlier)?;
            let hold = decision.getattr(intern!(py, "hold"))?;
            if !hold.is_none() {
                let key = PyTuple::new(py, [hold.getattr(intern!(py, "wallet"))?, hold.getattr(intern!(py, "hold"))?])?;
                holds.set_item(key, hold)?;
            }
        }
        decisions.append(decision)?;
    }
    Ok(decisions)
}

/// Where a batch's decisions go: the partition's state.
struct Context<'a, 'py> {
    core: &'a Core,
    wallets: &'a Bound<'py, PyDict>,
    stored_decisions: &'a Bound<'py, PyDict>,
    holds: &'a Bound<'py, PyDict>,
    partition: i64,
}

impl<'a, 'py> Context<'a, 'py> {
    /// A stored decision, made and written into the state as `decide_batch` writes it.
    #[allow(clippy::too_many_arguments)]
    fn stored(
        &self,
        parsed: &Bound<'py, PyAny>,
        asked: &Asked<'py>,
        reply: Bound<'py, PyDict>,
        wallet: &Wallet,
        hold: Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>,
        fingerprint: String,
        at_ms: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = parsed.py();
        let core = self.core;
        let wallet = core.wallet_object(&asked.wallet, wallet)?;
        let fingerprint = PyString::new(py, &fingerprint);
        let hold_object = match &hold {
            Some((_, object)) => object.clone(),
            None => py.None().into_bound(py),
        };
        let decision = core.decision.bind(py).call1((
            parsed,
            &reply,
            true,
            &wallet,
            &hold_object,
            &fingerprint,
            &asked.memo,
            at_ms,
        ))?;
        self.wallets.set_item(&asked.wallet, wallet)?;
        let earlier = core.stored_decision.bind(py).call1((fingerprint, reply))?;
        self.stored_decisions.set_item(PyTuple::new(py, [&asked.wallet, &asked.id])?, earlier)?;
        if let Some((name, object)) = hold {
            self.holds.set_item(PyTuple::new(py, [&asked.wallet, &name])?, object)?;
        }
        Ok(decision)
    }
}

/// The decision of one record, or `None` for the Python core to make it.
fn decide<'py>(
    context: &Context<'_, 'py>,
    parsed: &Bound<'py, PyAny>,
    at_ms: i64,
    formatted: &mut Option<(i64, Bound<'py, PyString>)>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let core = context.core;
    let (wallets, stored_decisions, holds, partition) =
        (context.wallets, context.stored_decisions, context.holds, context.partition);
    let py = parsed.py();
    if !(0..=FORMATTED_MAX_MS).contains(&at_ms) {
        return Ok(None);
    }
    let command = parsed.getattr(intern!(py, "command"))?;
    if !command.get_type().is(core.command.bind(py)) || !command.getattr(intern!(py, "usage"))?.is_none() {
        return Ok(None);
    }
    let op = match core.op_of(&command.getattr(intern!(py, "op"))?) { Some(v) => v, None => return Ok(None) };
    let hold = command.getattr(intern!(py, "hold"))?;
    let asked = Asked {
        op,
        id: command.getattr(intern!(py, "id"))?,
        wallet: command.getattr(intern!(py, "wallet"))?,
        amount: command.getattr(intern!(py, "amount"))?.extract()?,
        floor: command.getattr(intern!(py, "floor"))?.extract()?,
        hold: if hold.is_none() { None } else { Some(hold) },
        ttl_ms: command.getattr(intern!(py, "ttl_ms"))?.extract()?,
        memo: command.getattr(intern!(py, "memo"))?,
    };
    let found = wallets.get_item(&asked.wallet)?;
    if found.is_none() && op != Op::Open {
        return Ok(None); // 404: the Python core answers it
    }
    let decision_key = PyTuple::new(py, [&asked.wallet, &asked.id])?;
    if stored_decisions.get_item(&decision_key)?.is_some() {
        return Ok(None); // a duplicate or an idempotency conflict
    }
    let id = asked.id.downcast::<PyString>()?.to_str()?;
    let name = asked.wallet.downcast::<PyString>()?.to_str()?;
    let hold_name = match &asked.hold {
        Some(hold) => Some(hold.downcast::<PyString>()?.to_str()?),
        None => None,
    };
    let fingerprint = fingerprint(&asked, id, name, hold_name);
    let at = match formatted {
        Some((cached, text)) if *cached == at_ms => text.clone(),
        _ => {
            let text = PyString::new(py, &format_time(at_ms));
            *formatted = Some((at_ms, text.clone()));
            text
        }
    };
    let found = match found {
        Some(found) => found,
        None => {
            // open
            let wallet = Wallet { balance: 0, reserved: 0, floor: asked.floor.unwrap_or(0), seq: 1, partition };
            assert_invariant(&wallet)?;
            let reply = reply(core, &asked, &wallet, &at, None)?;
            return context.stored(parsed, &asked, reply, &wallet, None, fingerprint, at_ms).map(Some);
        }
    };
    let wallet = read_wallet(&found)?;
    let hold = match &asked.hold {
        Some(hold_name) => match holds.get_item(PyTuple::new(py, [&asked.wallet, hold_name])?)? {
            Some(hold) => Some(read_hold(&hold)?),
            None => None,
        },
        None => None,
    };
    let seq = wallet.seq + 1;
    match effect(&asked, wallet, hold, at_ms, partition)? {
        Err(Refusal::HoldNotExpired) => Ok(None), // unstored: the Python core answers it
        Err(refusal) => {
            let after = Wallet { seq, ..wallet };
            let reply = reply(core, &asked, &after, &at, Some(refusal))?;
            context.stored(parsed, &asked, reply, &after, None, fingerprint, at_ms).map(Some)
        }
        Ok(outcome) => {
            let after = Wallet { seq, ..outcome.wallet };
            assert_invariant(&after)?;
            let reply = reply(core, &asked, &after, &at, None)?;
            reply.set_item(intern!(py, "amount"), outcome.amount)?;
            if let Some(expires_at_ms) = outcome.expires_at_ms {
                if !(0..=FORMATTED_MAX_MS).contains(&expires_at_ms) {
                    return Ok(None);
                }
                let hold = if op == Op::Reserve { &asked.id } else { asked.hold.as_ref().expect("a hold's op") };
                reply.set_item(intern!(py, "hold"), hold)?;
                reply.set_item(intern!(py, "expires_at"), format_time(expires_at_ms))?;
            }
            let hold = match outcome.hold {
                None => None,
                Some(hold) => {
                    // A reserve's hold is named by its id; the other ops name the hold they change.
                    let name = if op == Op::Reserve { asked.id.clone() } else { asked.hold.clone().expect("a hold's op") };
                    let object = core.hold.bind(py).call1((
                        &asked.wallet,
                        &name,
                        hold.amount,
                        hold.expires_at_ms,
                        hold.open,
                        hold.partition,
                    ))?;
                    Some((name, object))
                }
            };
            context.stored(parsed, &asked, reply, &after, hold, fingerprint, at_ms).map(Some)
        }
    }
}

/// A stored decision's reply, in the Python core's order of fields: an accepted one
/// (`_accepted`) or a refusal (`_stored`'s).
fn reply<'py>(
    core: &Core,
    asked: &Asked<'py>,
    after: &Wallet,
    at: &Bound<'py, PyString>,
    refusal: Option<Refusal>,
) -> PyResult<Bound<'py, PyDict>> {
    let py = at.py();
    let reply = PyDict::new(py);
    reply.set_item(intern!(py, "v"), 1)?;
    reply.set_item(intern!(py, "id"), &asked.id)?;
    reply.set_item(intern!(py, "wallet"), &asked.wallet)?;
    reply.set_item(intern!(py, "op"), core.op_name(py, asked.op))?;
    reply.set_item(intern!(py, "ok"), refusal.is_none())?;
    match refusal {
        None => {
            reply.set_item(intern!(py, "status"), STATUS_OK)?;
            reply.set_item(intern!(py, "error"), py.None())?;
        }
        Some(refusal) => {
            reply.set_item(intern!(py, "status"), refusal.status())?;
            reply.set_item(intern!(py, "error"), refusal.code())?;
        }
    }
    reply.set_item(intern!(py, "at"), at)?;
    reply.set_item(intern!(py, "duplicate"), false)?;
    reply.set_item(intern!(py, "balance"), after.balance)?;
    reply.set_item(intern!(py, "reserved"), after.reserved)?;
    reply.set_item(intern!(py, "available"), after.available())?;
    if let Some(refusal) = refusal {
        reply.set_item(intern!(py, "message"), refusal.message())?;
    }
    reply.set_item(intern!(py, "seq"), after.seq)?;
    Ok(reply)
}

impl Core {
    fn wallet_object<'py>(&self, name: &Bound<'py, PyAny>, wallet: &Wallet) -> PyResult<Bound<'py, PyAny>> {
        let py = name.py();
        self.wallet.bind(py).call1((name, wallet.balance, wallet.reserved, wallet.floor, wallet.seq, wallet.partition))
    }
}
