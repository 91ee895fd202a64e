"""Root test configuration. Area conftests live beside their tests."""
