"""Wire schemas of the admin API (``/admin/api/...``), used by the web console and scripts.

Unlike the compatible-mode schemas these refuse unknown fields: the admin API is ours, and a field it
does not know (a typo such as ``balence``) must be a 400 naming it rather than a key created without a
balance. Amounts are CNY, as a JSON number or a decimal string (``"12.5"``) with at most 6 decimals;
the service turns them into exact micro-units.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Amount = StrictStr | StrictInt | float


class AdminModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateKeyIn(AdminModel):
    name: StrictStr
    # Absent or null: an unmetered key. 0 is a metered key with nothing to spend yet.
    balance: Amount | None = None
    rpm: StrictInt | None = Field(default=None, ge=1)
    tpm: StrictInt | None = Field(default=None, ge=1)


class TopUpIn(AdminModel):
    amount: Amount


class LimitsIn(AdminModel):
    """Each limit: absent leaves it as it is, null removes it, an integer >= 1 sets it."""

    rpm: StrictInt | None = Field(default=None, ge=1)
    tpm: StrictInt | None = Field(default=None, ge=1)


class PriceIn(AdminModel):
    """A model's price, CNY per 1K tokens, both parts required (0 is free)."""

    input_price: Amount
    output_price: Amount
