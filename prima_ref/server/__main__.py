from prima_ref.server import main

raise SystemExit(main())
