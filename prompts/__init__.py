"""DeepSeek V4 chat encoding (messages, DSML tool calls, streaming parser) and prompt texts."""
