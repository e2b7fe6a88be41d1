"""Remote execution: the versioned wire protocol (``protocol``) and, later, the client."""
