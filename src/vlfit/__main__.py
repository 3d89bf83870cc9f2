from vlfit.cli import main

main()
