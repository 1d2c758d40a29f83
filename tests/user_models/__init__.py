"""Networks a user might bring: defined here, outside the zoo, built by `package.module:factory`."""
