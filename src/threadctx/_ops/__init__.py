"""The operator's view: the report, its signal and command exchange, the watchdog and the metrics.

Modules here import from the layers below (``_snapshot``, ``_carry``, ``_text``...), never the other
way round; see CONTRIBUTING.md for the order.
"""
