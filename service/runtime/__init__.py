"""Process life: workers and forkservers that die with the gateway, and rate-limited logging."""
