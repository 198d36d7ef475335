from meal_cache.cli import main

main()
