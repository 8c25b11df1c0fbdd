"""MCP: levante as a client of MCP servers (their tools offered to the model) and as an MCP server."""
from levante.mcp.client import McpTool, McpToolManager, ToolCallResult
from levante.mcp.config import McpConfig, McpConfigError, McpServerConfig

__all__ = ["McpConfig", "McpConfigError", "McpServerConfig", "McpTool", "McpToolManager", "ToolCallResult"]
