"""Security decisions without I/O: hook interfaces (more to move here, see DESIGN.md)."""
