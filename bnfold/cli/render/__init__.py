"""How outcomes are shown: human text (plain, or rich on a terminal), JSON, JUnit XML and the
GitHub step summary."""
