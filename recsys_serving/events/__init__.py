"""The weblog event contract and the intake path shared by the collector and the CLI."""
