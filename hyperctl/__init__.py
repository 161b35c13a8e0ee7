"""hyperctl: the command-line client of hypervisord. It speaks only the REST API and the
websocket, so it drives a daemon on another machine as well as a local one."""
