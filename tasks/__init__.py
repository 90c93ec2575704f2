"""One thin Prefect task per stage: calls its eagle_core entry point, reports cached/computed,
publishes UI artifacts; retries transient I/O only. Tasks pass artifact URLs, never data."""
