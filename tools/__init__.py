"""Tools the model calls: files, search, shell jobs, git; workspace sandbox and permissions.

Entry points for the rest of the agent:
  registry.ToolRegistry.from_data(workspace, policy=...)   the tool set from tools.json
    .schemas()                                              tool definitions for the system prompt
    .call(name, arguments, ctx) -> result.ToolResult        never raises for the model's input
    .check(name, arguments) -> permissions.PermissionDecision
    .journal (journal.UndoJournal), .policy, .workspace, .close()
  context.ToolContext(turn, cancel, approve, denials)      per-call state from the agent loop
  settings.load_permission_settings(root, user_config_dir) modes and rules from the config files
"""
