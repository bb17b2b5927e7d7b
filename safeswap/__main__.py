from safeswap.cli import main

main()
