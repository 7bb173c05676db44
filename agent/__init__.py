"""The agent: loop, terminal UI, slash commands, headless runs and the `ds4-agent` CLI."""
