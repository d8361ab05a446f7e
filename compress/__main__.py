from compress.commands.entry import main

main()
