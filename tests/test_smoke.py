import pytest

from floorguard import InsufficientFunds
from tests.conftest import wait_until_serving


async def test_open_credit_charge(workers, ledger):
    workers.start()
    await wait_until_serving(ledger)
    opened = await ledger.open("w1")
    assert opened.ok and opened.seq == 1
    credited = await ledger.credit("w1", 100)
    assert credited.balance == 100
    charged = await ledger.charge("w1", 60)
    assert charged.balance == 40 and charged.amount == 60
    with pytest.raises(InsufficientFunds) as refused:
        await ledger.charge("w1", 41)
    assert refused.value.available == 40
