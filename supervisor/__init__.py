"""The process tree of one orch8 node: a supervisor and its worker processes."""
