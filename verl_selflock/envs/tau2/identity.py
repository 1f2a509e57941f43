"""The user's identity in a tau2 telecom task, for two critique rules of :mod:`verl_selflock.envs.tau2.critiques`.

The user's identity is tau2's user device phone number and the customer record it belongs to. A tool
call whose arguments name a customer, line, bill or phone number of *another* customer is
``wrong_identity`` (-1); the user's message revealing their name, phone number or customer id for
the first time is an ``identity_slot`` signal (+1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["IDENTITY_ARG_KEYS", "CustomerIdentity"]

IDENTITY_ARG_KEYS = ("customer_id", "line_id", "bill_id", "phone_number", "id")


@dataclass
class CustomerIdentity:
    """What identifies the user in one episode, and which identity slots they revealed so far."""

    own: set[str]
    """Values of the user's own records (customer id, phone numbers, line and bill ids)."""
    foreign: set[str]
    """Values of other customers' records (empty when the user has no customer record)."""
    slots: dict[str, str]
    """Revealable slots (``name``, ``phone_number``, ``customer_id``) -> the user's value."""
    revealed: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, environment: Any) -> CustomerIdentity:
        """Read the identity from tau2's environment in the task's initial state."""
        db = environment.tools.db
        surroundings = environment.user_tools.db.surroundings
        phone = surroundings.phone_number
        own: set[str] = set()
        slots: dict[str, str] = {}
        if surroundings.name:
            slots["name"] = str(surroundings.name)
        if phone:
            slots["phone_number"] = str(phone)
            try:
                customer = environment.tools.get_customer_by_phone(phone)
            except Exception:  # noqa: BLE001  (a scenario without a matching customer: no identity rule)
                customer = None
            if customer is not None:
                own |= {customer.customer_id, customer.phone_number, *customer.line_ids, *customer.bill_ids}
                own |= {line.phone_number for line in db.lines if line.line_id in set(customer.line_ids)}
                slots["customer_id"] = customer.customer_id
        every = {c.customer_id for c in db.customers} | {c.phone_number for c in db.customers}
        every |= {line.line_id for line in db.lines} | {line.phone_number for line in db.lines}
        every |= {bill.bill_id for bill in db.bills}
        return cls(own=own, foreign=(every - own) if own else set(), slots=slots)

    def names_foreign(self, arguments: Mapping[str, Any]) -> bool:
        """A tool call's arguments name another customer's record."""
        return any(
            isinstance(arguments.get(key), str) and arguments[key] in self.foreign for key in IDENTITY_ARG_KEYS
        )

    def new_slots(self, text: str) -> list[str]:
        """Slots the user's message reveals for the first time (marked revealed)."""
        digits = re.sub(r"\D", "", text)
        lowered = text.lower()
        found = []
        for slot, value in self.slots.items():
            if slot in self.revealed:
                continue
            hit = (re.sub(r"\D", "", value) in digits) if slot == "phone_number" else (value.lower() in lowered)
            if hit:
                self.revealed.add(slot)
                found.append(slot)
        return found
