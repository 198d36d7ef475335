"""`python -m meal_cache.cli`, as with the single module it replaces."""

from meal_cache.cli import main

main()
