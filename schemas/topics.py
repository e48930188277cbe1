"""Topic registry (DESIGN §6). Names may take a configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """Every topic name the system uses, with the prefix applied."""

    prefix: str = ""

    def _name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def raw(self) -> str:
        return self._name("spend.raw")

    @property
    def attributed(self) -> str:
        return self._name("spend.attributed")

    @property
    def tag_spend(self) -> str:
        return self._name("spend.tag-spend")

    @property
    def budgets(self) -> str:
        return self._name("spend.budgets")

    @property
    def budget_blocks(self) -> str:
        return self._name("spend.budget-blocks")

    @property
    def budget_alerts(self) -> str:
        return self._name("spend.budget-alerts")

    @property
    def alert_deliveries(self) -> str:
        return self._name("spend.alert-deliveries")

    @property
    def dead_letter(self) -> str:
        return self._name("spend.dead-letter")

    @property
    def faust_app_id(self) -> str:
        """Faust app id: also the prefix of the changelog topics of its tables."""
        return self._name("spendledger")

    @property
    def sink_group(self) -> str:
        """The sink's consumer group."""
        return self._name("spendledger-sink")

    def consumed(self) -> dict[str, list[str]]:
        """Consumer group -> the topics it reads: what has to be empty before a stop loses nothing."""
        return {
            self.faust_app_id: [self.raw, self.budgets, self.tag_spend, self.budget_alerts],
            self.sink_group: [
                self.attributed, self.dead_letter, self.budgets, self.budget_blocks, self.budget_alerts,
                self.alert_deliveries,
            ],
        }  # fmt: skip

    def all(self) -> dict[str, bool]:
        """Topic name -> compacted, for the topics we create up front."""
        return {
            self.raw: False,
            self.attributed: False,
            self.tag_spend: False,
            self.budgets: True,
            self.budget_blocks: True,
            self.budget_alerts: False,
            self.alert_deliveries: False,
            self.dead_letter: False,
        }
